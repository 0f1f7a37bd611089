"""Where inputs are prepared: in CPU tasks, or inside the encoder actor (``resources.prepare.where``;
``auto`` prepares in the actor when it runs on CPUs alone). Both places give the same rows, the
same error values and the same vectors; only the graph differs."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from encoders.core.errors import error_code
from pipeline.adapter import ResolvedStage
from pipeline.cluster import ClusterShape
from pipeline.config import ConfigError, config_from_dict
from pipeline.plan import plan, prepare_place
from tests.audio_data import write_bad_files


def _config(tmp_path, model: str, column: str = "text", resources: dict | None = None, **encoder):
    data = {
        "sources": [{"path": str(tmp_path / "in"), "id_column": "id"}],
        "output": {"path": str(tmp_path / "out"), "max_error_rate": 0.9},
        "encoders": [{"output": "v", "column": column, "model": model, **encoder}],
    }
    if resources is not None:
        data["resources"] = resources
    return data


def test_auto_prepares_in_the_actor_on_cpus_and_in_tasks_beside_a_gpu(tiny_bert, tmp_path):
    cpu = ResolvedStage(num_cpus=0.5, num_gpus=0.0, batch_size=8, pool=(2, 2))
    assert prepare_place("auto", cpu) == "encoder"
    assert prepare_place("auto", ResolvedStage(num_cpus=1, num_gpus=1.0, batch_size=8, pool=(1, 4))) == "tasks"
    assert prepare_place("auto", ResolvedStage(0.5, 0.0, 8, (1, 1), resources={"tpu_host": 1})) == "tasks"
    assert prepare_place("tasks", cpu) == "tasks"
    assert prepare_place("encoder", ResolvedStage(num_cpus=1, num_gpus=1.0, batch_size=8)) == "encoder"

    (p,) = plan(config_from_dict(_config(tmp_path, tiny_bert)), ClusterShape(cpus=2, gpus=0))
    assert p.prepare_in_encoder and p.encode.num_gpus == 0
    (p,) = plan(config_from_dict(_config(tmp_path, tiny_bert)), ClusterShape(cpus=8, gpus=1))
    assert not p.prepare_in_encoder and p.encode.num_gpus == 1
    pinned = _config(tmp_path, tiny_bert, resources={"prepare": {"where": "tasks"}})
    (p,) = plan(config_from_dict(pinned), ClusterShape(cpus=2, gpus=0))
    assert not p.prepare_in_encoder


@pytest.mark.parametrize(
    "resources, encoder_resources, message",
    [
        ({"prepare": {"where": "gpu"}}, None, "resources.prepare.where: 'gpu' is not valid; valid values: auto, tasks"),
        ({"encode": {"where": "encoder"}}, None, "resources.encode.where: only resources.prepare has a place"),
        (None, {"where": "tasks"}, "encoders[0].resources.where: only resources.prepare has a place"),
    ],
)
def test_a_bad_prepare_place_is_one_line_naming_the_field(tmp_path, resources, encoder_resources, message):
    data = _config(tmp_path, "x", resources=resources)
    if encoder_resources:
        data["encoders"][0]["resources"] = encoder_resources
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_an_embedded_dataset_shows_no_prepare_stage_when_the_actor_prepares(ray_session, tiny_bert):
    """``embed`` on a Dataset: the actor tokenizes its own batches (no Prepare operator), and the
    vectors and errors equal those of prepare tasks."""
    import ray

    from pipeline.graph import embed

    texts = ["a short line", None, "", "a longer line of text about moving vectors", "x " * 3000]
    rows = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    encoder = {"encoders": [{"output": "v", "column": "text", "model": tiny_bert, "precision": "fp32"}]}
    results = {}
    for where in ("auto", "tasks"):
        ds = embed(ray.data.from_items(rows), {**encoder, "resources": {"prepare": {"where": where}}})
        done = ds.materialize()
        stats = done.stats()
        assert ("Prepare[v]" in stats) == (where == "tasks") and "Encode[v]" in stats, stats
        results[where] = sorted(done.take_all(), key=lambda r: r["id"])
    auto, tasks = results["auto"], results["tasks"]
    assert [r["id"] for r in auto] == [r["id"] for r in tasks] == [str(i) for i in range(len(texts))]
    for a, t in zip(auto, tasks):
        assert a["v_error"] == t["v_error"]
        assert (a["v_embedding"] is None) == (t["v_embedding"] is None)
        if a["v_embedding"] is not None:
            assert np.allclose(a["v_embedding"], t["v_embedding"], atol=1e-5)
    assert [error_code(r["v_error"]) if r["v_error"] else None for r in auto][1:3] == [None, "empty_text"]
    assert auto[1]["v_embedding"] is None and auto[0]["v_embedding"] is not None


def test_a_folder_of_good_and_bad_clips_gives_the_same_rows_in_either_place(ray_session, tmp_path):
    """Files read and decoded inside the actor: every file once, the same error values, and the
    vectors of prepare tasks (fp32 both times)."""
    import importlib.util

    from pipeline.graph import run

    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("resemblyzer weights not installed (pip install --no-deps resemblyzer==0.1.4)")
    expected = {name: code for name, code in write_bad_files(tmp_path / "in").items() if name != "missing.wav"}
    tables = {}
    for where in ("auto", "tasks"):
        data = _config(tmp_path, "resemblyzer", column="audio", precision="fp32")
        data["sources"] = [{"path": str(tmp_path / "in"), "kind": "audio"}]
        data["output"]["path"] = str(tmp_path / f"out-{where}")
        data["resources"] = {"prepare": {"where": where}}
        manifest = run(data)
        assert manifest["status"] == "complete"
        tables[where] = pq.read_table(tmp_path / f"out-{where}").sort_by("id").to_pylist()
    auto, tasks = tables["auto"], tables["tasks"]
    assert [r["id"] for r in auto] == [r["id"] for r in tasks] == sorted(expected)
    for a, t in zip(auto, tasks):
        code = error_code(a["v_error"]) if a["v_error"] else None
        assert code == expected[a["id"]] and a["v_error"] == t["v_error"], a["id"]
        assert a["v_windows"] == t["v_windows"]
        if code is None:
            a_vec, t_vec = np.asarray(a["v_embedding"]), np.asarray(t["v_embedding"])
            assert float(a_vec @ t_vec) > 0.99999, a["id"]
