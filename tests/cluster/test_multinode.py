"""The real multi-node cluster tests (``multinode_cases.py``) in their own process.

``ray.cluster_utils.Cluster`` starts a head and two worker raylets on 127.0.0.1; running it
in a subprocess keeps it apart from the session's shared local Ray in this process. The cases:
a job submitted through the head's job API meets the output contract (>= 2,000 rows, tiny
BERT against a direct model call), stages spread over the nodes, a worker node's raylet
SIGKILLed mid-job, and the driver SIGKILLed mid-job and the config re-run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.slow  # about 2.5-3 minutes on 2 cores
def test_multinode_cluster_cases(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-x",
            "-rA",
            # Its own base temp: pytest prunes old numbered temp folders across processes.
            f"--basetemp={tmp_path / 'cases'}",
            str(HERE / "multinode_cases.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    summary = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, summary
    for case in (
        "test_job_output_meets_the_contract",
        "test_stages_spread_over_the_nodes",
        "test_worker_loss",
        "test_driver_loss_then_rerun",
        "test_pool_and_threads_follow_each_nodes_cpus",
    ):
        assert f"PASSED tests/cluster/multinode_cases.py::{case}" in result.stdout, summary
