"""What the cluster offers: the resources it has now, the GPUs its autoscaler can add, and this
driver's own Ray processes. The one place that touches Ray's private API.

Ray publishes the autoscaler's limits and a node's processes only through private modules. Each
use here is guarded by the Ray versions it was checked against (``PRIVATE_API_RAY``); on any
other Ray, or if the private name moved, it falls back to the public API and files (the
launcher's config on the head; a plain ``ray.shutdown``), and says so in the debug log.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Ray release lines whose private API below was read and tested (tests/cluster, tests/pipeline).
PRIVATE_API_RAY = ("2.60.",)
# Where `ray up` puts the autoscaling config on the head, where a submitted job's driver runs.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class ClusterShape:
    """What the cluster offers now, plus the most GPUs its autoscaler can bring up."""

    cpus: float
    gpus: float
    max_gpus: float = 0.0  # the autoscaler's GPU limit (0: no autoscaled GPUs)
    node_cpus: tuple[float, ...] = ()  # each alive node's CPUs; () reads as one node of ``cpus``

    @property
    def nodes(self) -> tuple[float, ...]:
        return self.node_cpus or (self.cpus,)

    @property
    def gpu_autoscale(self) -> bool:
        return self.max_gpus > 0


def cluster_shape(resources: Mapping[str, float] | None = None, autoscaler: Any = None) -> ClusterShape:
    """What the cluster has now, and whether the autoscaler can add GPU nodes. A GPU group
    that starts at zero shows no GPUs in ``cluster_resources()`` until something asks for one,
    so ``gpus: auto`` also looks at the autoscaler's node types (the cluster config it
    publishes to the GCS; absent on a local Ray)."""
    import ray

    nodes: tuple[float, ...] = ()
    if resources is None:
        resources = ray.cluster_resources()
        nodes = tuple(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive"))
    return ClusterShape(
        cpus=float(resources.get("CPU", 0)),
        gpus=float(resources.get("GPU", 0)),
        max_gpus=autoscaler_max_gpus(autoscaler),
        node_cpus=nodes,
    )


def retried_io_errors() -> list[str]:
    """Ray Data's patterns for transient storage errors (``DataContext.retried_io_errors``),
    for the encoders' and sink's own I/O, which import no Ray."""
    from ray.data import DataContext

    return list(DataContext.get_current().retried_io_errors)


def node_budget(cpus: float) -> float:
    """The CPUs encoder actors may reserve on one node: all but one, so that read, prepare and
    write tasks always have a CPU there; on a 1-CPU node, half of it."""
    return cpus - 1.0 if cpus >= 2 else cpus * 0.5


def threads_for_node(node_cpus: float, reservation: float, encoders: int = 1, most_actors: int | None = None) -> int:
    """Torch threads for a CPU actor reserving ``reservation`` CPUs on a node of ``node_cpus``:
    the node's cores shared by the actors its budget fits, or by ``most_actors`` when the pool
    is smaller (one actor reserving 1 CPU on a 2-core node runs 2 threads; 15 such actors on a
    16-core node run 1 each; a pool of one on that node runs 16)."""
    actors = max(1, math.floor(node_budget(node_cpus) / max(1, encoders) / reservation + 1e-9))
    if most_actors is not None:
        actors = max(1, min(actors, most_actors))
    return max(1, math.floor(node_cpus / (actors * max(1, encoders))))


@dataclass(frozen=True)
class NodeThreads:
    """Decided inside the actor, from the node it landed on as Ray reports it (the driver only
    knows the cluster): passed to the encode stage, which imports no Ray."""

    reservation: float
    encoders: int = 1
    most_actors: int | None = None  # a node's share of a pool smaller than the cluster fits

    def __call__(self) -> int:
        return threads_for_node(this_node_cpus(), self.reservation, self.encoders, self.most_actors)


def this_node_cpus() -> float:
    """This process's node's logical CPUs, as Ray reports them (the machine's count outside Ray)."""
    import os

    import ray

    if ray.is_initialized():
        here = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == here:
                return float(node["Resources"].get("CPU", 0)) or float(os.cpu_count() or 1)
    return float(os.cpu_count() or 1)


def autoscaler_max_gpus(autoscaler: Any = None, launcher_config: str | Path = LAUNCHER_CONFIG) -> float:
    """The most GPUs the autoscaler can bring up (0 when it can add none). Two sources: the
    cluster config the autoscaler publishes to the GCS (KubeRay and autoscaler v2; what Ray
    Data's own autoscaler reads), then the cluster launcher's config on the head (``ray up``):
    per GPU node type, ``max_workers`` x its GPUs. Tests pass fakes for both; ``autoscaler``
    has ``get_max_resources_from_cluster_config()``."""
    autoscaler = autoscaler if autoscaler is not None else _autoscaler_state()
    limits = autoscaler.get_max_resources_from_cluster_config() if autoscaler is not None else None
    if limits and float(limits.get("GPU", 0) or 0) > 0:
        return float(limits["GPU"])
    return launcher_max_gpus(Path(launcher_config).expanduser())


def can_autoscale_gpus(autoscaler: Any = None, launcher_config: str | Path = LAUNCHER_CONFIG) -> bool:
    return autoscaler_max_gpus(autoscaler, launcher_config) > 0


def launcher_max_gpus(path: Path) -> float:
    import yaml

    if not path.is_file():
        return 0.0
    config = yaml.safe_load(path.read_text()) or {}
    cap = config.get("max_workers", 0) or 0  # the launcher's default for a node type's max_workers
    total = 0.0
    for node_type in (config.get("available_node_types") or {}).values():
        gpus = float((node_type.get("resources") or {}).get("GPU", 0) or 0)
        total += gpus * float(node_type.get("max_workers", cap) or 0)
    return total


def own_monitor_processes() -> list[Any]:
    """The autoscaler monitor process(es) of the Ray this process started (``subprocess.Popen``),
    or none: a driver that joined a cluster has none of its own."""
    if not _private_api_checked():
        return []
    try:
        from ray._private import ray_constants, worker

        node = worker._global_node
        infos = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []
        return [info.process for info in infos]
    except (ImportError, AttributeError):  # a private record, moved or renamed in another Ray
        log.debug("Ray's node record has changed; shutting down the plain way", exc_info=True)
        return []


def _autoscaler_state() -> Any:
    """``ray._private.state.state``: the GCS client that reads the published cluster config."""
    if not _private_api_checked():
        return None
    try:
        from ray._private.state import state
    except ImportError:  # a private module; the launcher's file still tells
        log.debug("ray._private.state is gone; reading only the launcher's config", exc_info=True)
        return None
    return state


def _private_api_checked() -> bool:
    import ray

    if ray.__version__.startswith(PRIVATE_API_RAY):
        return True
    log.debug(
        "Ray %s is not a version omniembed's private-API uses were checked on (%s); using the public fallbacks",
        ray.__version__,
        ", ".join(PRIVATE_API_RAY),
    )
    return False
