"""hf-text ``backend: onnx``: the same vectors as torch, padding honoured, int8 close, exports cached.

Every encoder is built and called through the family (build_spec, prepare, load), so the ONNX
path runs exactly the pipeline's code; only the transformer's forward differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES, resolve_weights
from encoders.core.registry import MissingDependencyError
from encoders.core.spec import SpecRequest
from encoders.text import onnx_backend

pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
FAMILY = FAMILIES.get("hf-text")
CPU = torch.device("cpu")
PAIRS = Path(__file__).resolve().parents[2] / "examples" / "data" / "docstring_pairs.jsonl"
ONE_BATCH = 10**6  # a token budget whose per-call overhead puts every row in one padded micro-batch


@pytest.fixture(scope="module", autouse=True)
def onnx_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("omniembed-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMNIEMBED_CACHE", str(cache))
        yield cache


def make_spec(weights, options=None, dim=None):
    return FAMILY.build_spec(SpecRequest("out", {"text": "c"}, weights, options or {}, dim))


def embed(spec, encoder, texts, max_tokens=8192):
    prepared = FAMILY.prepare(spec, "text", pa.array(texts))
    result = encoder("text", prepared.values, max_tokens=max_tokens)
    assert result.valid.all()
    return result.vectors


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same(actual, expected):
    diff = float(np.abs(actual - expected).max())
    print(f"onnx vs torch: max abs diff {diff:.2e}, min cosine {cosines(actual, expected).min():.7f}")
    assert diff <= 1e-4 or cosines(actual, expected).min() >= 0.99999, f"max abs diff {diff:.2e}"


@pytest.fixture(scope="module")
def docstrings():
    """Real Python docstrings: one-line summaries and their long bodies, mixed in input order."""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()[:40]]
    return [text for pair in pairs for text in (pair["anchor"], pair["positive"])]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    weights = resolve_weights(MINILM_ID)
    torch_spec = make_spec(weights, {"precision": "fp32"}, dim=384)
    onnx_spec = make_spec(weights, {"backend": "onnx"}, dim=384)
    return torch_spec, FAMILY.load(torch_spec, CPU), onnx_spec, FAMILY.load(onnx_spec, CPU)


@pytest.fixture(scope="module")
def minilm_int8(minilm):
    spec = make_spec(minilm[2].weights, {"backend": "onnx", "quantize": "int8"}, dim=384)
    return spec, FAMILY.load(spec, CPU)


def test_minilm_onnx_matches_torch_on_padded_batches(minilm, docstrings):
    torch_spec, torch_encoder, onnx_spec, onnx_encoder = minilm
    lengths = [
        len(ids) for row in FAMILY.prepare(torch_spec, "text", pa.array(docstrings)).values.to_pylist() for ids in row
    ]
    assert min(lengths) < 12 and max(lengths) > 100  # one micro-batch is mostly padding for the short ones
    expected = embed(torch_spec, torch_encoder, docstrings, ONE_BATCH)
    assert_same(embed(onnx_spec, onnx_encoder, docstrings, ONE_BATCH), expected)


def test_tiny_st_onnx_matches_torch(tiny_st, docstrings):
    """CLS pooling and Normalize from the folder, max_seq_length 48: the same head code runs."""
    weights = resolve_weights(tiny_st)
    torch_spec = make_spec(weights, {"precision": "fp32"}, dim=32)
    onnx_spec = make_spec(weights, {"backend": "onnx"}, dim=32)
    assert onnx_spec.options["pooling"] == "cls" and onnx_spec.options["normalize"]
    expected = embed(torch_spec, FAMILY.load(torch_spec, CPU), docstrings, ONE_BATCH)
    actual = embed(onnx_spec, FAMILY.load(onnx_spec, CPU), docstrings, ONE_BATCH)
    assert_same(actual, expected)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


def test_attention_mask_is_a_dynamic_input(minilm, docstrings):
    _, _, spec, encoder = minilm
    inputs = {i.name: i.shape for i in encoder.model.session.get_inputs()}
    assert set(inputs) >= {"input_ids", "attention_mask"}
    assert all(isinstance(dim, str) for dim in inputs["attention_mask"]), inputs  # batch, sequence symbolic
    short, long = min(docstrings, key=len), max(docstrings, key=len)
    alone = embed(spec, encoder, [short])
    padded = embed(spec, encoder, [short, long], ONE_BATCH)[:1]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_the_padding_check_catches_a_mask_that_is_ignored(minilm, docstrings):
    """Control: with the mask replaced by ones (what a baked trace does), the padded short row
    moves far from its vector alone, so the test above would fail."""
    _, _, spec, encoder = minilm
    short, long = min(docstrings, key=len), max(docstrings, key=len)
    forward = onnx_backend.OnnxTransformer.__call__

    def mask_ignored(self, **inputs):
        return forward(self, **{**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_backend.OnnxTransformer, "__call__", mask_ignored)
        baked = embed(spec, encoder, [short, long], ONE_BATCH)[:1]
    alone = embed(spec, encoder, [short])
    print(f"a short docstring next to a long one, mask ignored: cosine {cosines(baked, alone)[0]:.4f} to alone")
    assert cosines(baked, alone).min() < 0.99


def test_int8_stays_close_to_fp32_on_real_text(minilm, minilm_int8, docstrings):
    torch_spec, torch_encoder, _, _ = minilm
    spec, encoder = minilm_int8
    cos = cosines(embed(spec, encoder, docstrings), embed(torch_spec, torch_encoder, docstrings))
    print(f"int8 vs torch fp32 on {len(docstrings)} docstrings: min cosine {cos.min():.5f}, mean {cos.mean():.5f}")
    assert cos.min() >= 0.98, f"row {cos.argmin()}: cosine {cos.min():.5f}"


def test_export_is_cached(minilm, minilm_int8, onnx_cache, monkeypatch):
    files = sorted(onnx_cache.glob(f"onnx/{minilm[2].weights_sha256}-*/model.onnx"))
    assert len(files) == 2 and all(f"opset{onnx_backend.OPSET}-torch{torch.__version__}" in str(f) for f in files)
    assert [f.parent.name.split("-")[3] for f in files] == ["int8", "none"]
    assert not list(onnx_cache.glob("onnx/.*"))  # no staging folder left behind
    mtimes = [f.stat().st_mtime_ns for f in files]

    def refuse(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_backend, "export", refuse)
    monkeypatch.setattr(onnx_backend, "quantize_int8", refuse)
    for spec in (minilm[2], minilm_int8[0]):
        assert FAMILY.load(spec, CPU).dim == 384
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_metadata_records_backend_and_quantize(minilm, minilm_int8):
    torch_options = minilm[0].metadata("cpu", "fp32")["options"]
    assert (torch_options["backend"], torch_options["quantize"]) == ("torch", "none")
    int8_options = minilm_int8[0].metadata("cpu", "fp32")["options"]
    assert (int8_options["backend"], int8_options["quantize"]) == ("onnx", "int8")


def test_onnx_runs_fp32_whatever_precision_asks(tiny_bert):
    spec = make_spec(resolve_weights(tiny_bert), {"backend": "onnx", "precision": "bf16"}, dim=32)
    assert spec.options["precision"] == "fp32"


@pytest.mark.parametrize(
    "options, words",
    [
        ({"quantize": "int8"}, ["quantize", "int8", "backend: onnx"]),
        ({"backend": "tensorrt"}, ["backend", "'tensorrt'", "torch, onnx"]),
        ({"backend": "onnx", "quantize": "int4"}, ["quantize", "'int4'", "none, int8"]),
    ],
)
def test_invalid_backend_options_are_one_line(tiny_bert, options, words):
    with pytest.raises(ValueError) as info:
        make_spec(resolve_weights(tiny_bert), options, dim=32)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_missing_onnxruntime_names_the_extra(tiny_bert, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # find_spec answers None: not installed
    with pytest.raises(MissingDependencyError) as info:
        make_spec(resolve_weights(tiny_bert), {"backend": "onnx"}, dim=32)
    assert str(info.value) == "backend: onnx needs the 'onnx' extra: pip install 'omniembed[onnx]'"
