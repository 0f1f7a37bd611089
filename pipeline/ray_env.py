"""Starting or joining Ray, only from entry points (CLI, jobs), never at import time."""
from __future__ import annotations

import logging
import os
import sys

LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
log = logging.getLogger(__name__)


def joins_cluster(address: str | None) -> bool:
    """An address (or RAY_ADDRESS, as inside a Ray job) other than "local" joins a cluster."""
    return (address or os.environ.get("RAY_ADDRESS") or "local") != "local"


def prepare_environment(address: str | None) -> None:
    """Call before Ray is first imported. A local embedded Ray listens on 127.0.0.1 only; a run
    that joins an existing cluster must keep the cluster's own addresses."""
    if not joins_cluster(address):
        if "ray" in sys.modules and os.environ.get(LOOPBACK_VAR) != "0":
            log.warning("ray was imported before omniembed could bind it to loopback")
        os.environ.setdefault(LOOPBACK_VAR, "0")
    # Tokenizers' own thread pool fights with torch and Ray workers; tasks are our parallelism.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def init_ray(address: str | None = None) -> None:
    prepare_environment(address)
    import ray

    if ray.is_initialized():
        return
    working_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if joins_cluster(address):
        ray.init(address=address or "auto", log_to_driver=True)
    else:
        # address="local": always a new embedded Ray, never a `ray start` cluster that happens
        # to run on this machine. Its processes inherit this environment: workers import
        # pipeline/ and encoders/ from the source tree through PYTHONPATH, and no job
        # runtime_env is set, so the workers Ray prestarts serve the first tasks and actors
        # (a runtime_env would make Ray discard them and start new ones).
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if working_dir not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([working_dir, *paths])
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
