"""``gpus: auto`` on a cluster whose GPU group starts at zero: the decision, with fakes for
the autoscaler's published cluster config and the launcher's config on the head."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.adapter import resolve_encode_stage
from pipeline.cluster import autoscaler_max_gpus, can_autoscale_gpus, cluster_shape
from pipeline.config import StageResources

ROOT = Path(__file__).resolve().parents[2]
CPU_ONLY = {"CPU": 4.0, "memory": 8e9}  # what ray.cluster_resources() shows before any GPU node starts


class FakeAutoscalerState:
    """Stands in for ``ray._private.state.state``."""

    def __init__(self, limits):
        self.limits = limits

    def get_max_resources_from_cluster_config(self):
        return self.limits


def test_gcs_cluster_config_with_a_gpu_group_requests_gpus(tmp_path):
    shape = cluster_shape(CPU_ONLY, FakeAutoscalerState({"CPU": 36, "GPU": 4}))
    assert shape.gpus == 0 and shape.gpu_autoscale and shape.max_gpus == 4
    stage = resolve_encode_stage(StageResources(), shape, 256, "encode")
    assert stage.num_gpus == 1.0 and stage.device == "cuda" and stage.pool == (1, 4)  # not (1, 1)
    # Fractions stay fractions: four replicas per GPU.
    quarter = resolve_encode_stage(StageResources(gpus=0.25), shape, 256, "encode")
    assert quarter.num_gpus == 0.25 and quarter.pool == (1, 16)


@pytest.mark.parametrize("limits", [None, {}, {"CPU": 8}, {"CPU": 8, "GPU": 0}])
def test_no_gpu_group_runs_on_cpu(limits, tmp_path):
    assert not can_autoscale_gpus(FakeAutoscalerState(limits), tmp_path / "absent.yaml")
    stage = resolve_encode_stage(StageResources(), cluster_shape(CPU_ONLY, FakeAutoscalerState(limits)), 256, "encode")
    assert stage.num_gpus == 0 and stage.device == "cpu"


def test_gpus_present_now_request_gpus_without_autoscaler():
    shape = cluster_shape({"CPU": 8.0, "GPU": 2.0}, FakeAutoscalerState(None))
    assert resolve_encode_stage(StageResources(), shape, 256, "encode").num_gpus == 1.0


def _launcher_config(tmp_path: Path, gpu_max_workers: int) -> Path:
    """This repo's cluster.yaml as the launcher writes it to the head."""
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text())))
    config["available_node_types"]["worker.gpu"]["max_workers"] = gpu_max_workers
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_launcher_config_on_the_head_with_gpu_group_from_zero(tmp_path):
    """`ray up cluster.yaml`: min_workers 0, so no GPU is visible, yet the group can start."""
    assert can_autoscale_gpus(FakeAutoscalerState(None), _launcher_config(tmp_path, 4))
    assert not can_autoscale_gpus(FakeAutoscalerState(None), _launcher_config(tmp_path, 0))
    # max_workers x GPUs per node: the pool can grow to every GPU the group can start.
    shape = cluster_shape(CPU_ONLY, FakeAutoscalerState(None))
    assert shape.max_gpus == 0  # this machine has no launcher file
    per_node = yaml.safe_load(_launcher_config(tmp_path, 4).read_text())["available_node_types"]["worker.gpu"]
    assert autoscaler_max_gpus(FakeAutoscalerState(None), _launcher_config(tmp_path, 4)) == 4 * float(
        per_node["resources"]["GPU"]
    )


def test_local_ray_has_no_autoscaled_gpus(ray_session, tmp_path):
    """The real GCS of a local Ray publishes no cluster config."""
    assert not can_autoscale_gpus(launcher_config=tmp_path / "absent.yaml")


# Custom resources place stages on chosen nodes (e.g. encoders on GPU nodes of one type).


def _config(resources):
    from pipeline.config import config_from_dict

    return config_from_dict(
        {
            "sources": [{"path": "in.parquet"}],
            "output": {"path": "out"},
            "encoders": [
                {"output": "t", "column": "text", "model": "m", "resources": {"cpus": 1, "resources": resources}}
            ],
            "resources": {"write": {"resources": {"io_slot": 1}}},
        }
    )


def test_custom_resources_reach_map_batches():
    from pipeline.adapter import ClusterShape, map_batches_kwargs, resolve_task_stage

    config = _config({"encode_slot": 0.5})
    encoder = config.stage("encode", config.encoders[0])
    assert encoder.resources == {"encode_slot": 0.5}
    stage = resolve_encode_stage(encoder, ClusterShape(cpus=4, gpus=0), 256, "encoders[0].resources")
    assert map_batches_kwargs(stage)["resources"] == {"encode_slot": 0.5}
    write = resolve_task_stage(config.stage("write"), 100)
    assert map_batches_kwargs(write)["resources"] == {"io_slot": 1.0}
    assert "resources" not in map_batches_kwargs(resolve_task_stage(config.stage("prepare"), 100))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"GPU": 1}, "encoders[0].resources.resources: 'GPU' is not a custom resource; use cpus, gpus or memory"),
        ({"slot": 0}, "encoders[0].resources.resources.slot: expected a number > 0, got 0"),
        ({"slot": "x"}, "encoders[0].resources.resources.slot: expected a number > 0, got 'x'"),
        ([1], "encoders[0].resources.resources must be a mapping, got [1]"),
    ],
)
def test_bad_custom_resources_name_the_field(bad, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError) as info:
        _config(bad)
    assert str(info.value) == message


def test_private_ray_api_only_on_checked_versions(monkeypatch, tmp_path):
    """pipeline/cluster.py reads Ray's private API only on the Ray line it was checked on; on any
    other Ray it falls back to the launcher's file and a plain shutdown."""
    import ray

    from pipeline import cluster

    assert ray.__version__.startswith(cluster.PRIVATE_API_RAY)
    assert hasattr(cluster._autoscaler_state(), "get_max_resources_from_cluster_config")
    monkeypatch.setattr(ray, "__version__", "9.99.0")
    assert cluster._autoscaler_state() is None and cluster.own_monitor_processes() == []
    assert not can_autoscale_gpus(launcher_config=tmp_path / "absent.yaml")
    assert can_autoscale_gpus(launcher_config=_launcher_config(tmp_path, 4))
