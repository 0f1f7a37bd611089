"""A run resolves ``precision: auto`` once and pins it: metadata and fingerprint say what ran,
vectors keep cosine >= 0.999 to an fp32 run, and a resume in another precision refuses."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoders.core.device import native_reduced
from pipeline.cli import main as cli_main
from tests.text_data import docstring_lines


@pytest.fixture
def docstrings(tmp_path):
    lines = docstring_lines(16)[:96]
    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": [f"d{i:03d}" for i in range(len(lines))], "text": lines}), path)
    return path


def embed(src, out, model, *flags):
    args = ["embed", str(src), "--id-column", "id", "--text-column", "text", "--text-model", model]
    return cli_main([*args, "--output", str(out), "--rows-per-file", "24", *flags])


def vectors(out):
    table = pq.read_table(out).sort_by("id")
    return np.array(table.column("text_embedding").to_pylist(), np.float32)


def test_auto_is_resolved_pinned_and_recorded(ray_session, minilm_path, docstrings, tmp_path):
    assert embed(docstrings, tmp_path / "auto", minilm_path) == 0
    assert embed(docstrings, tmp_path / "fp32", minilm_path, "--precision", "fp32") == 0
    manifest = json.loads((tmp_path / "auto" / "_manifest.json").read_text())
    expected = "bf16" if native_reduced(torch.device("cpu")) == "bf16" else "fp32"  # MiniLM passes the gate
    assert manifest["encoders"]["text"]["precision"] == expected
    part = next((tmp_path / "auto").glob("part-*.parquet"))
    meta = json.loads(pq.read_schema(part).metadata[b"omniembed"])
    assert meta["encoders"]["text"]["precision"] == expected
    auto, fp32 = vectors(tmp_path / "auto"), vectors(tmp_path / "fp32")
    cosines = (auto * fp32).sum(1) / np.linalg.norm(auto, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosines.min() >= 0.999
    # A re-run of the complete output with the same policy is the same output.
    assert embed(docstrings, tmp_path / "auto", minilm_path) == 0


def test_a_resume_in_another_precision_refuses(ray_session, tiny_bert, docstrings, tmp_path, capsys):
    out = tmp_path / "out"
    assert embed(docstrings, out, tiny_bert, "--precision", "fp32") == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["files"].pop()  # a driver that died before recording its last part
    manifest["status"] = "running"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert embed(docstrings, out, tiny_bert, "--precision", "bf16") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run of a different config or model" in err[0]
    assert embed(docstrings, out, tiny_bert, "--precision", "fp32") == 0  # the same precision resumes
    assert json.loads((out / "_manifest.json").read_text())["status"] == "complete"


def test_an_embedded_ray_reads_a_cached_answer_in_the_driver(ray_session, tiny_bert, tmp_path, monkeypatch):
    """On the one node of an embedded Ray the driver's cache is the node's: a cached answer
    pins the precision with no probe task. Without a cached answer, or on a cluster, the probe
    task runs on a node of the encoder's kind."""
    import ray

    import pipeline.precision as precision
    from encoders.core.fidelity import choose_precision
    from pipeline.cluster import ClusterShape
    from pipeline.config import config_from_dict
    from pipeline.plan import plan

    config = config_from_dict(
        {
            "sources": [{"path": str(tmp_path / "x.parquet"), "id_column": "id"}],
            "output": {"path": str(tmp_path / "out")},
            "encoders": [{"output": "text", "column": "text", "model": tiny_bert}],
        }
    )
    plans = plan(config, ClusterShape(cpus=2, gpus=0))
    spec = plans[0].spec
    monkeypatch.setenv("OMNIEMBED_CACHE", str(tmp_path / "cache"))
    assert precision.embedded()  # the session's Ray: init_ray started it here

    class NoTask(Exception):
        pass

    def no_task(*args, **kwargs):
        raise NoTask

    monkeypatch.setattr(ray, "remote", no_task)
    candidate = native_reduced(torch.device("cpu"))
    if candidate is None:  # no native bf16: fp32 needs no probe, cache or not
        assert precision.resolve_precisions(plans, None)[0].spec.options["precision"] == "fp32"
        return
    with pytest.raises(NoTask):  # nothing cached yet: only a probe task can tell
        precision.resolve_precisions(plans, None)
    # What a probe on this machine would have cached (a refusal, so that fp32 shows it was read).
    report = choose_precision(torch.device("cpu"), precision._probe_key(spec), lambda c: (0.5, 64))
    assert report["precision"] == "fp32" and report["min_cosine"] == 0.5
    resolved = precision.resolve_precisions(plans, None)
    assert resolved[0].pinned and resolved[0].spec.options["precision"] == "fp32"
    monkeypatch.setattr(precision, "embedded", lambda: False)  # a cluster: the task decides
    with pytest.raises(NoTask):
        precision.resolve_precisions(plans, None)
