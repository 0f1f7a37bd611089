"""precision: auto's fidelity gate: reduced precision only where it keeps every vector within
cosine 0.999 of fp32, measured on real inputs through the run's own probe (pipeline/precision.py),
and cached per model and device."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoders.core import fidelity
from encoders.core.device import native_reduced
from pipeline.chunks import plan_sources
from pipeline.config import config_from_dict
from pipeline.plan import plan_encoders
from pipeline.precision import probe_task
from pipeline.stages import check_native
from pipeline.tasks import LocalTasks
from tests.image_data import encode, real_photos
from tests.text_data import docstring_lines

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(native_reduced(CPU) != "bf16", reason="this CPU has no native bf16 (AVX512-BF16/AMX)")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIEMBED_CACHE", str(tmp_path / "cache"))


def test_no_native_reduced_precision_means_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(fidelity, "native_reduced", lambda device: None)
    report = fidelity.choose_precision(CPU, {"model": "m"}, lambda candidate: pytest.fail("measured"))
    assert report["precision"] == "fp32" and report["candidate"] is None


def test_the_gate_keeps_or_refuses_and_the_answer_is_cached(monkeypatch):
    monkeypatch.setattr(fidelity, "native_reduced", lambda device: "bf16")
    calls = []

    def measure(cosine, rows=64):
        def run(candidate):
            calls.append(candidate)
            return cosine, rows

        return run

    assert fidelity.choose_precision(CPU, {"model": "good"}, measure(0.9995))["precision"] == "bf16"
    refused = fidelity.choose_precision(CPU, {"model": "bad"}, measure(0.9985))  # EfficientNet's random-input figure
    assert refused["precision"] == "fp32" and refused["candidate"] == "bf16" and refused["min_cosine"] == 0.9985
    assert fidelity.choose_precision(CPU, {"model": "good"}, measure(0.5))["precision"] == "bf16"  # cached
    assert calls == ["bf16", "bf16"]
    # Too few probe rows decide nothing: fp32 for that run, and the next run measures again.
    for _ in range(2):
        few = fidelity.choose_precision(CPU, {"model": "tiny input"}, measure(0.99999, rows=2))
        assert few["precision"] == "fp32" and few["rows"] == 2
    assert calls == ["bf16", "bf16", "bf16", "bf16"]
    assert fidelity.choose_precision(CPU, {"model": "tiny input"}, measure(0.99999))["precision"] == "bf16"


def test_an_actor_on_a_node_without_the_pinned_precision_fails_loudly(monkeypatch):
    import encoders.core.device as device

    monkeypatch.setattr(device, "native_reduced", lambda d: None)
    check_native("text", "fp32", CPU)  # fp32 runs anywhere
    with pytest.raises(RuntimeError, match="resolved precision: auto to bf16 on another node.*never mixes precisions"):
        check_native("text", "bf16", CPU)


def probe(tmp_path, source, encoder):
    config = config_from_dict({"sources": [source], "encoders": [encoder], "output": {"path": str(tmp_path / "o")}})
    spec = plan_encoders(config.encoders)[0]
    return probe_task(spec, 2, 8192, plan_sources(config.sources, LocalTasks()).chunks, None)


@pytest.fixture
def docstrings(tmp_path):
    lines = docstring_lines(16)
    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(len(lines))], "text": lines}), path)
    return {"path": str(path), "id_column": "id"}


@needs_bf16
def test_minilm_keeps_bf16_on_real_texts(tmp_path, docstrings, minilm_path):
    report = probe(tmp_path, docstrings, {"output": "t", "column": "text", "model": minilm_path})
    assert report["rows"] == 64 and report["candidate"] == "bf16"
    assert report["min_cosine"] >= fidelity.MIN_COSINE and report["precision"] == "bf16"


@needs_bf16
def test_a_probe_that_fails_the_gate_falls_back_to_fp32(tmp_path, docstrings, minilm_path, monkeypatch):
    monkeypatch.setattr(fidelity, "MIN_COSINE", 1.000001)  # no reduced precision can pass it
    report = probe(tmp_path, docstrings, {"output": "t", "column": "text", "model": minilm_path})
    assert report["precision"] == "fp32" and report["candidate"] == "bf16" and report["min_cosine"] < 1.000001


@needs_bf16
def test_efficientnet_decides_by_its_cosine_on_real_photos(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="extra 'weights' not installed")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, array in real_photos().items():  # each photo as taken and mirrored both ways: 39 rows
        for variant, pixels in (("", array), ("-lr", array[:, ::-1]), ("-ud", array[::-1])):
            (folder / f"{name}{variant}.jpg").write_bytes(encode(np.ascontiguousarray(pixels)))
    encoder = {"output": "i", "column": "image", "model": "efficientnet-lite0"}
    report = probe(tmp_path, {"path": str(folder), "kind": "image"}, encoder)
    assert report["rows"] == 3 * len(real_photos()) >= fidelity.MIN_ROWS and report["candidate"] == "bf16"
    assert (report["precision"] == "bf16") == (report["min_cosine"] >= fidelity.MIN_COSINE)
    cache = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert list(cache.values()) == [report]
    assert np.isfinite(report["min_cosine"])
