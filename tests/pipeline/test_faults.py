"""One bad row is one error value: the encode actor bisects a failed batch down to the row
that fails, and a circuit breaker stops on what bad data does not explain."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from encoders.core.spec import EncodeResult
from pipeline import faults
from pipeline.columns import embedding_column, error_column, prepared_column
from pipeline.faults import EncoderBug, RowGuard
from pipeline.stages import EncodeActor, prepare_batch


def fake_model(poison=(), error=ValueError, oom_above: int | None = None):
    """Vectors [value, value] per row; raises when a poisoned value is in the batch, or when the
    token budget is above ``oom_above`` (a CUDA out-of-memory stand-in)."""
    calls = []

    def fn(values: pa.Array, max_tokens: int) -> EncodeResult:
        calls.append((len(values), max_tokens))
        data = values.to_pylist()
        if oom_above is not None and max_tokens > oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        bad = [v for v in data if v in poison]
        if bad:
            raise error(f"cannot encode {bad[0]}")
        vectors = np.array([[v, v] for v in data], np.float32).reshape(len(data), 2)
        return EncodeResult(vectors, np.ones(len(data), bool), {"count": np.array(data, np.int32)})

    return fn, calls


def test_a_failing_row_is_bisected_out_and_the_rest_embedded():
    fn, calls = fake_model(poison={37})
    result, errors = RowGuard().encode(fn, pa.array(range(64)), 8192, dim=2)
    assert [i for i, e in enumerate(errors) if e] == [37]
    assert errors[37] == "encode_failed: ValueError: cannot encode 37"
    assert result.valid.tolist() == [i != 37 for i in range(64)]
    assert np.array_equal(result.vectors[result.valid], np.array([[i, i] for i in range(64) if i != 37], np.float32))
    assert result.extras["count"][36] == 36 and result.extras["count"][38] == 38
    assert len(calls) <= 1 + 2 * 6  # log2(64) levels of two halves each


def test_the_breaker_stops_on_a_bug_not_on_bad_data():
    everything = set(range(8))
    fn, _ = fake_model(poison=everything, error=TypeError)
    with pytest.raises(EncoderBug, match="all 8 rows of a batch failed alone") as caught:
        RowGuard().encode(fn, pa.array(range(8)), 8192, dim=2)
    assert isinstance(caught.value.__cause__, TypeError)  # the traceback of the real error

    guard = RowGuard()  # scattered bad rows: more than 5% of the first rows is a bug too
    fn, _ = fake_model(poison=set(range(0, 1000, 10)))
    with pytest.raises(EncoderBug, match=r"of the first \d+ rows failed to encode"):
        for start in range(0, 1000, 64):
            guard.encode(fn, pa.array(range(start, min(start + 64, 1000))), 8192, dim=2)

    guard = RowGuard()  # 1% bad rows: error values, no stop
    fn, _ = fake_model(poison=set(range(0, 2000, 100)))
    failed = sum(
        e is not None for s in range(0, 2000, 64) for e in guard.encode(fn, pa.array(range(s, s + 64)), 8192, 2)[1]
    )
    assert failed == 20


def test_out_of_memory_shrinks_the_token_budget_before_giving_up_on_a_row(monkeypatch):
    monkeypatch.setattr(faults, "_free_cuda_cache", lambda: None)
    fn, calls = fake_model(oom_above=1024)
    result, errors = RowGuard().encode(fn, pa.array(range(16)), 8192, dim=2)
    assert result.valid.all() and not any(errors)
    assert [t for _, t in calls] == [8192, 4096, 2048, 1024]  # same rows, half the budget each time


def test_encode_actor_gives_one_row_encode_failed_in_a_batch_of_64(tiny_bert):
    from tests.pipeline.test_audio import plan

    spec = plan(tiny_bert, "text")
    texts = [f"the red shoe number {i} on a shelf" + " again" * (i % 7) for i in range(64)]
    batch = pa.table({"id": [f"r{i}" for i in range(64)], "text": texts})
    prepared = prepare_batch(batch, spec)
    clean = EncodeActor(spec, threads=1, max_tokens=8192)(prepared).to_pydict()

    faulty = EncodeActor(spec, threads=1, max_tokens=8192)
    real = faulty.model
    poison = prepared.column(prepared_column(spec, "text"))[23].as_py()

    def model(modality, values, max_tokens):
        if poison in values.to_pylist():
            raise RuntimeError("index out of range in self")
        return real(modality, values, max_tokens=max_tokens)

    faulty.model = model
    out = faulty(prepared).to_pydict()
    errors, vectors = out[error_column(spec, "text")], out[embedding_column(spec, "text")]
    assert errors[23] == "encode_failed: RuntimeError: index out of range in self"
    assert all(e is None for i, e in enumerate(errors) if i != 23) and vectors[23] is None
    reference = clean[embedding_column(spec, "text")]
    for i in range(64):
        if i != 23:  # bisecting changes micro-batch shapes: equal within 1e-5 in fp32
            np.testing.assert_allclose(vectors[i], reference[i], atol=1e-5)


def _image_spec():
    from pipeline.config import config_from_dict
    from pipeline.plan import plan_encoders

    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install 'omniembed[weights]'")
    config = config_from_dict(
        {
            "sources": [{"path": "x", "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [{"output": "img", "column": "image", "model": "efficientnet-lite0"}],
        }
    )
    return plan_encoders(config.encoders)[0]


def test_a_row_whose_preparation_crashes_alone_is_prepare_failed(monkeypatch):
    """A decoder crash the family does not expect (here struct.error, as a malformed file can
    raise inside Pillow) fails that row only; every other row is prepared as in a clean run."""
    import struct

    from encoders.image import prepare as image_prepare
    from tests.image_data import encode, real_photos

    spec = _image_spec()
    photos = [encode(p, "JPEG") for p in list(real_photos().values())[:6]]
    batch = pa.table({"id": [f"p{i}" for i in range(6)], "image": photos})
    clean = prepare_batch(batch, spec)
    real = image_prepare.decode_rgb

    def crashing(data, max_pixels=image_prepare.DEFAULT_MAX_PIXELS):
        if data == photos[3]:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return real(data, max_pixels)

    monkeypatch.setattr(image_prepare, "decode_rgb", crashing)
    out = prepare_batch(batch, spec)
    errors = out.column(error_column(spec, "image")).to_pylist()
    assert errors == [None, None, None, "prepare_failed: error: unpack requires a buffer of 4 bytes", None, None]
    got, want = out.column(prepared_column(spec, "image")), clean.column(prepared_column(spec, "image"))
    assert got[3].as_py() is None
    assert [got[i].as_py() for i in (0, 1, 2, 4, 5)] == [want[i].as_py() for i in (0, 1, 2, 4, 5)]


def test_preparation_that_fails_on_every_row_alike_or_on_a_tired_store_stops(monkeypatch):
    from encoders.core import retry
    from encoders.image import prepare as image_prepare
    from tests.image_data import encode, real_photos

    spec = _image_spec()
    photos = [encode(p, "JPEG") for p in list(real_photos().values())[:4]]
    batch = pa.table({"id": [f"p{i}" for i in range(4)], "image": photos})

    def bug(data, max_pixels=0):
        raise TypeError("an argument our code passes wrongly")

    monkeypatch.setattr(image_prepare, "decode_rgb", bug)
    with pytest.raises(EncoderBug, match="all 4 rows of a batch failed alone"):
        prepare_batch(batch, spec)

    calls = []

    def tired(data, max_pixels=0):
        calls.append(1)
        raise OSError("AWS Error SLOW_DOWN during GetObject operation")

    monkeypatch.setattr(image_prepare, "decode_rgb", tired)
    monkeypatch.setattr(retry, "FIRST_WAIT_SECONDS", 0.0)
    with pytest.raises(OSError, match="SLOW_DOWN"):
        prepare_batch(batch, spec)
    assert len(calls) == 1  # a transient error that outlasted its retries is not bisected into rows
