"""cluster.yaml against Ray's own cluster-config validator, offline, and its security settings
checked on the *prepared* config (``prepare_config`` merges Ray's defaults, which bind the
dashboard to 0.0.0.0 whenever the file leaves its own start commands out)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOKEN_PATH = "~/.ray/auth_token"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _dashboard_hosts(commands: list[str]) -> list[str]:
    return [m for c in commands for m in re.findall(r"--dashboard-host[= ](\S+)", c)]


def test_validates_against_rays_schema(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head.cpu", "worker.gpu"}


def test_head_is_cpu_only_and_gpu_group_autoscales_from_zero(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any("--num-gpus=0" in c for c in prepared["head_start_ray_commands"])
    worker = prepared["available_node_types"]["worker.gpu"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 1
    assert worker["resources"]["GPU"] >= 1


def test_dashboard_binds_to_loopback_only(prepared):
    head = prepared["head_start_ray_commands"]
    assert _dashboard_hosts(head) == ["127.0.0.1"]
    everything = head + prepared["worker_start_ray_commands"]
    assert not any("0.0.0.0" in c for c in everything)
    assert not _dashboard_hosts(prepared["worker_start_ray_commands"])


def test_rays_defaults_would_expose_the_dashboard(raw):
    """The reason for the override: without it, prepare_config brings in 0.0.0.0."""
    from ray.autoscaler._private.util import prepare_config

    bare = copy.deepcopy(raw)
    del bare["head_start_ray_commands"]
    assert "0.0.0.0" in _dashboard_hosts(prepare_config(bare)["head_start_ray_commands"])


def test_token_auth_on_every_node(prepared):
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        starts = [c for c in commands if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
        assert all("RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in c for c in starts)
    # file_mounts reach the head and every worker the autoscaler starts.
    assert prepared["file_mounts"][TOKEN_PATH] == TOKEN_PATH
    assert any("RAY_AUTH_MODE=token" in c for c in prepared["setup_commands"])


def test_setup_installs_the_project_and_pinned_torch_on_every_node(prepared):
    setup = prepared["setup_commands"]  # common to head and workers
    assert any('pip install ".[weights]"' in c for c in setup)
    pins = (ROOT / "pyproject.toml").read_text()
    for pin in ("torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"):
        assert pin in pins


def test_nothing_open_to_the_internet(prepared):
    """No rule for 0.0.0.0/0, and both node types bring their own security group (without
    one, Ray creates a group with SSH open to anywhere)."""
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(r.get("CidrIp") == "0.0.0.0/0" for rule in rules for r in rule.get("IpRanges", []))
    for node_type in prepared["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"]
        # The validator ignores node_config; check the names of what users fill in.
        assert set(node_type["node_config"]) >= {"InstanceType", "ImageId", "SecurityGroupIds", "SubnetIds"}


def test_validator_is_shallow_about_node_config(raw):
    """Documents why the test above checks node_config itself."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    typo = copy.deepcopy(raw)
    typo["available_node_types"]["worker.gpu"]["node_config"]["InstanceTyp"] = "g5.2xlarge"
    validate_config(prepare_config(typo))


def test_runtime_env_example_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((ROOT / "examples" / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**data, working_dir=str(ROOT))
    assert ".git" in env["excludes"] and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
