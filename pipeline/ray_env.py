"""Starting or joining Ray, only from entry points (CLI, jobs), never at import time."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
log = logging.getLogger(__name__)
_embedded = False  # init_ray started a local Ray in this process: one node, this machine


def embedded() -> bool:
    """Ray runs embedded in this process (``init_ray`` started it): its one node is this
    machine, so the driver sees the hardware every worker gets and no autoscaler adds others."""
    import ray

    if not (_embedded and ray.is_initialized()):
        return False
    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1  # not since re-initialised elsewhere


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


def init_ray(address: str | None = None, quiet: bool = False) -> None:
    """``quiet``: Ray's own log lines at ERROR and above only (the CLI without ``-v``)."""
    prepare_environment(address)
    import ray

    level = logging.ERROR if quiet else logging.INFO

    if ray.is_initialized():
        return
    working_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if joins_cluster(address):
        ray.init(address=address or "auto", log_to_driver=True, logging_level=level)
    else:
        # address="local": always a new embedded Ray, never a `ray start` cluster that happens
        # to run on this machine. Its processes inherit this environment: workers import
        # pipeline/ and encoders/ from the source tree through PYTHONPATH, and no job
        # runtime_env is set, so the workers Ray prestarts serve the first tasks and actors
        # (a runtime_env would make Ray discard them and start new ones).
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if working_dir not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([working_dir, *paths])
        ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=level)
        global _embedded
        _embedded = True


def shutdown_ray() -> None:
    """``ray.shutdown()``, about 1 s sooner for an embedded Ray this process started.

    A local Ray has no autoscaler, but Ray still runs its autoscaler monitor. ``ray.shutdown``
    stops the GCS first and then sends the monitor SIGTERM. The monitor's handler then tries to
    report "the autoscaler failed" through the stopped GCS, so Ray waits its full second and
    then kills it (Ray 2.60; ``ray.shutdown`` took 1.37 s, 0.4 s without that wait). The monitor
    holds no state, so it is killed first here. Finding it reads Ray's private node record
    (pipeline/cluster.py): on another Ray, the plain shutdown still runs. A driver that joined a
    cluster has no monitor of its own and stops nothing but itself."""
    import ray

    if not ray.is_initialized():
        return
    from pipeline.cluster import own_monitor_processes

    for process in own_monitor_processes():
        try:
            process.kill()
            process.wait(timeout=1)
        except (OSError, subprocess.TimeoutExpired):  # already gone, or slow to go: ray.shutdown follows
            log.debug("could not stop Ray's autoscaler monitor", exc_info=True)
    ray.shutdown()
    global _embedded
    _embedded = False
