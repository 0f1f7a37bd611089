"""The one place where stage resources become Ray Data ``map_batches`` arguments.

Stages are plain functions and classes that never import Ray; this adapter applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from encoders.core.allocator import ONE_ARENA
from pipeline.cluster import ClusterShape, NodeThreads, node_budget, threads_for_node
from pipeline.config import ConfigError, StageResources

# An encoder actor's glibc settings, ahead of any the job sets (Ray expands ${...} from the
# worker's environment; an empty one leaves a trailing ':' that glibc ignores).
ACTOR_TUNABLES = ONE_ARENA + ":${GLIBC_TUNABLES}"


@dataclass(frozen=True)
class ResolvedStage:
    """A stage's resources with every default chosen for this cluster."""

    num_cpus: float
    num_gpus: float
    batch_size: int
    pool: tuple[int, int] | None = None  # actor pool (min, max); None for tasks
    memory: int | None = None
    threads: int = 1  # torch threads inside an encoder actor
    max_tokens: int = 8192
    resources: Mapping[str, float] | None = None  # Ray custom resources
    node_threads: NodeThreads | None = None  # decides ``threads`` in the actor, from its node

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


def resolve_task_stage(res: StageResources, default_batch: int) -> ResolvedStage:
    return ResolvedStage(
        num_cpus=res.cpus if res.cpus is not None else 1.0,
        num_gpus=0.0,
        batch_size=res.batch_rows or default_batch,
        memory=res.memory,
        resources=res.resources,
    )


def wants_gpu(res: StageResources, shape: ClusterShape) -> bool:
    if res.gpus == "auto":
        return shape.gpus > 0 or shape.gpu_autoscale
    return float(res.gpus) > 0


def resolve_encode_stage(
    res: StageResources,
    shape: ClusterShape,
    default_batch: int,
    where: str,
    cpu_encoders: int = 1,
    actor_threads: int | None = None,
) -> ResolvedStage:
    return replace(
        _resolve_encode_stage(res, shape, default_batch, where, cpu_encoders, actor_threads), resources=res.resources
    )


def _resolve_encode_stage(
    res: StageResources,
    shape: ClusterShape,
    default_batch: int,
    where: str,
    cpu_encoders: int,
    actor_threads: int | None,
) -> ResolvedStage:
    """GPU actors when asked for or when ``auto`` finds GPUs; otherwise CPU actors that never
    reserve every CPU (read and prepare tasks must still run), with torch using the cores the
    reservation leaves idle. ``cpu_encoders`` CPU encoder pools share the spare CPUs.

    ``actor_threads`` is a family's measured preference on CPU (e.g. 1 for an LSTM, whose
    per-step barriers make a multi-threaded forward stall whenever a prepare task takes a core):
    unless the stage sets cpus, pool or threads, the cores go to that many threads per actor in
    as many actors as fit, which split the spare reservation."""
    gpus = (1.0 if res.gpus == "auto" else float(res.gpus)) if wants_gpu(res, shape) else 0.0
    batch = res.batch_rows or default_batch
    if gpus > 0:
        cpus = res.cpus if res.cpus is not None else 1.0
        # The pool may grow to every GPU the cluster can have: the ones up now, or the
        # autoscaler's maximum, over GPUs per actor (fractions give several replicas per GPU).
        slots = max(1, math.floor(max(shape.gpus, shape.max_gpus, gpus) / gpus))
        pool = res.pool or (1, slots)
        return ResolvedStage(cpus, gpus, batch, pool, res.memory, res.threads or 2, res.max_tokens)
    encoders = max(1, cpu_encoders)
    budgets = [node_budget(n) / encoders for n in shape.nodes]  # per node: one CPU stays free for tasks
    spare = max(budgets, default=0.0)
    if spare <= 0:
        raise ConfigError(f"{where}: the cluster has no CPU for encoders ({shape.cpus:g} CPU)")
    if actor_threads and res.cpus is None and res.pool is None and res.threads is None:
        # Per node, as many actor_threads-thread actors as its cores hold, sharing its budget.
        per_node = [(b, max(1, math.floor(n / encoders / actor_threads))) for n, b in zip(shape.nodes, budgets)]
        reservation = min(b / actors for b, actors in per_node)
        # Starts with one node's worth (the whole pool on one machine, as measured) and grows.
        pool = (max(actors for _, actors in per_node), sum(actors for _, actors in per_node))
        return ResolvedStage(reservation, 0.0, batch, pool, res.memory, actor_threads, res.max_tokens)
    cpus = res.cpus if res.cpus is not None else min(1.0, spare)
    if cpus > spare:
        raise ConfigError(
            f"{where}.cpus: {cpus:g} would reserve every CPU of a node (at most {spare:g} of the largest node's "
            f"{max(shape.nodes):g} for each of {encoders} encoder(s)); use at most {spare:g}"
        )
    # The pool's maximum is what every node's budget fits; Ray Data spreads actors over nodes.
    fit = sum(math.floor(b / cpus + 1e-9) for b in budgets) if cpus > 0 else 1
    pool = res.pool or (1, max(1, fit))
    if cpus > 0 and pool[0] > fit:
        raise ConfigError(
            f"{where}.pool: {pool[0]} actors x {cpus:g} CPU would reserve every CPU of a node ({fit} fit, one CPU "
            "per node stays free); lower pool or cpus"
        )
    pool = (pool[0], min(pool[1], fit)) if cpus > 0 else pool
    if res.threads:
        return ResolvedStage(cpus, 0.0, batch, pool, res.memory, res.threads, res.max_tokens)
    # Threads are decided in each actor from its own node; ``threads`` is the largest node's figure.
    if cpus <= 0:
        return ResolvedStage(cpus, 0.0, batch, pool, res.memory, max(1, math.floor(max(shape.nodes))), res.max_tokens)
    node_threads = NodeThreads(cpus, encoders, math.ceil(pool[1] / len(shape.nodes)))
    threads = threads_for_node(max(shape.nodes), cpus, encoders, node_threads.most_actors)
    return ResolvedStage(cpus, 0.0, batch, pool, res.memory, threads, res.max_tokens, node_threads=node_threads)


def read_remote_args(res: StageResources, prepare: ResolvedStage, small_chunks: bool) -> tuple[dict[str, Any], bool]:
    """The chunk read's Ray resources, and whether it fuses with the first prepare.

    Unless ``resources.read`` is set, a read of small chunks (folder groups, small files) takes
    the prepare's resources, so Ray Data fuses the two: one task reads a chunk and prepares it
    a batch at a time. Otherwise the read is a stage of its own (``resources.read``, one CPU by
    default, which its block cutting fuses with): a large chunk would be prepared serially in
    one task, while its blocks can fan out to parallel prepare tasks."""
    fused = small_chunks and res == StageResources()
    stage = prepare if fused else resolve_task_stage(res, 1)
    args = {k: v for k, v in map_batches_kwargs(stage).items() if k in ("num_cpus", "num_gpus", "memory", "resources")}
    return args, fused


def map_batches_kwargs(stage: ResolvedStage) -> dict[str, Any]:
    import ray.data

    kwargs: dict[str, Any] = {"batch_size": stage.batch_size, "batch_format": "pyarrow", "num_cpus": stage.num_cpus}
    if stage.num_gpus:
        kwargs["num_gpus"] = stage.num_gpus
    if stage.resources:
        kwargs["resources"] = dict(stage.resources)
    if stage.memory:
        # Ray Data can't prevent OOMs for a stage whose memory it does not know.
        kwargs["memory"] = stage.memory
    if stage.pool is not None:
        kwargs["compute"] = ray.data.ActorPoolStrategy(min_size=stage.pool[0], max_size=stage.pool[1])
        # One malloc arena in the actor's process: the forward runs on Ray Data's UDF thread,
        # whose own arena maps and unmaps every block over 64 MiB (encoders/core/allocator.py);
        # EfficientNet-Lite0 ran 2666 images in 55 s against 87 s without it. glibc reads this
        # only at start, so each actor takes a fresh worker process (about a second of start-up,
        # beside its model load); the job's own GLIBC_TUNABLES follow ours. It also keeps Ray Data
        # from fusing a task stage into the actor (equal remote args are fused, which would run
        # tokenize/decode serially with the model). Torch threads are set in the constructor.
        kwargs["runtime_env"] = {"env_vars": {"GLIBC_TUNABLES": ACTOR_TUNABLES}}
    return kwargs


def named(fn: Callable[..., Any] | type, name: str) -> Callable[..., Any] | type:
    """``fn`` under the stage's name: Ray Data names an operator after its function or class
    (``MapBatches(Encode[title])``), so progress bars and ``ds.stats()`` tell stages apart. A
    class becomes a subclass, a function a thin wrapper; both pickle by value, the wrapped
    stage by reference."""
    if isinstance(fn, type):
        return type(name, (fn,), {"__module__": fn.__module__, "__qualname__": name})

    def stage(batch: Any, **kwargs: Any) -> Any:
        return fn(batch, **kwargs)

    stage.__name__ = stage.__qualname__ = name
    return stage


def apply_stage(
    dataset: Any,
    fn: Callable[..., Any] | type,
    stage: ResolvedStage,
    *,
    name: str | None = None,
    fn_kwargs: dict[str, Any] | None = None,
    fn_constructor_kwargs: dict[str, Any] | None = None,
) -> Any:
    kwargs = map_batches_kwargs(stage)
    if fn_kwargs:
        kwargs["fn_kwargs"] = fn_kwargs
    if fn_constructor_kwargs:
        kwargs["fn_constructor_kwargs"] = fn_constructor_kwargs
    return dataset.map_batches(named(fn, name) if name else fn, **kwargs)
