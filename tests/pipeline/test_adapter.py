"""The adapter is tested with a fake dataset that records its keyword arguments."""

from __future__ import annotations

import platform

import pytest

from pipeline.adapter import ClusterShape, apply_stage, resolve_encode_stage, resolve_task_stage
from pipeline.config import ConfigError, StageResources


class RecordingDataset:
    def __init__(self):
        self.calls = []

    def map_batches(self, fn, **kwargs):
        self.calls.append((fn, kwargs))
        return self


def test_cpu_pool_never_reserves_every_cpu():
    for cpus in (2, 3, 8, 64):
        stage = resolve_encode_stage(StageResources(), ClusterShape(cpus=cpus, gpus=0), 256, "e")
        assert stage.num_gpus == 0
        assert stage.pool[1] * stage.num_cpus <= cpus - 1


def test_threads_are_not_the_reservation():
    # Two cores: one actor reserving one CPU, torch using both cores.
    stage = resolve_encode_stage(StageResources(), ClusterShape(cpus=2, gpus=0), 256, "e")
    assert (stage.num_cpus, stage.pool, stage.threads) == (1.0, (1, 1), 2)
    half = resolve_encode_stage(StageResources(cpus=0.5, threads=2), ClusterShape(cpus=2, gpus=0), 256, "e")
    assert half.num_cpus == 0.5 and half.threads == 2


def test_family_thread_preference_spreads_actors_over_the_cores():
    # An LSTM family prefers 1 thread: two 1-thread actors on two cores, 1 CPU reserved in all.
    stage = resolve_encode_stage(StageResources(), ClusterShape(cpus=2, gpus=0), 32, "e", actor_threads=1)
    assert (stage.num_cpus, stage.pool, stage.threads) == (0.5, (2, 2), 1)
    for cpus, encoders in ((3, 1), (16, 1), (16, 3)):
        stages = [
            resolve_encode_stage(StageResources(), ClusterShape(cpus=cpus, gpus=0), 32, "e", encoders, 1)
            for _ in range(encoders)
        ]
        assert sum(s.pool[1] * s.num_cpus for s in stages) <= cpus - 1  # tasks keep a CPU
        assert sum(s.pool[1] * s.threads for s in stages) <= cpus  # no oversubscribed cores
    # The user's own cpus/pool/threads win over the family's preference.
    mine = resolve_encode_stage(StageResources(threads=2), ClusterShape(cpus=2, gpus=0), 32, "e", actor_threads=1)
    assert (mine.pool, mine.threads) == ((1, 1), 2)
    on_gpu = resolve_encode_stage(StageResources(), ClusterShape(cpus=8, gpus=1), 32, "e", actor_threads=1)
    assert on_gpu.num_gpus == 1 and on_gpu.pool == (1, 1)


def test_encoders_share_the_spare_cpus():
    # Two CPU encoders on two cores: together they must still leave one CPU for tasks.
    stages = [
        resolve_encode_stage(StageResources(), ClusterShape(cpus=2, gpus=0), 256, "e", cpu_encoders=2) for _ in range(2)
    ]
    assert sum(s.pool[1] * s.num_cpus for s in stages) <= 1
    assert all(s.threads == 1 for s in stages)
    big = [
        resolve_encode_stage(StageResources(), ClusterShape(cpus=16, gpus=0), 256, "e", cpu_encoders=3)
        for _ in range(3)
    ]
    assert sum(s.pool[1] * s.num_cpus for s in big) <= 15


def test_pool_that_takes_every_cpu_is_refused():
    with pytest.raises(ConfigError, match="every CPU"):
        resolve_encode_stage(StageResources(cpus=2), ClusterShape(cpus=2, gpus=0), 256, "encoders[0].resources")
    with pytest.raises(ConfigError, match="pool"):
        resolve_encode_stage(StageResources(pool=(2, 4)), ClusterShape(cpus=2, gpus=0), 256, "e")
    one = resolve_encode_stage(StageResources(), ClusterShape(cpus=1, gpus=0), 256, "e")
    assert (one.num_cpus, one.pool) == (0.5, (1, 1))  # a 1-CPU node: an actor reserves at most half


def test_gpus_auto_follows_the_cluster():
    gpu = resolve_encode_stage(StageResources(), ClusterShape(cpus=16, gpus=4), 256, "e")
    assert gpu.num_gpus == 1.0 and gpu.pool == (1, 4) and gpu.device == "cuda"
    shared = resolve_encode_stage(StageResources(gpus=0.25), ClusterShape(cpus=16, gpus=2), 256, "e")
    assert shared.pool == (1, 8)
    autoscaled = resolve_encode_stage(StageResources(), ClusterShape(cpus=4, gpus=0, max_gpus=4), 256, "e")
    assert autoscaled.num_gpus == 1.0 and autoscaled.pool == (1, 4)  # grows with the autoscaler, from zero
    growing = resolve_encode_stage(StageResources(gpus=0.5), ClusterShape(cpus=8, gpus=1, max_gpus=8), 256, "e")
    assert growing.pool == (1, 16)  # GPUs up now do not cap a pool the autoscaler can grow
    cpu = resolve_encode_stage(StageResources(gpus=0), ClusterShape(cpus=16, gpus=4), 256, "e")
    assert cpu.num_gpus == 0 and cpu.device == "cpu"


def test_map_batches_arguments_for_actor_and_task_stages():
    import ray.data

    ds = RecordingDataset()
    encode = resolve_encode_stage(
        StageResources(gpus=0.5, memory=2 << 30, batch_rows=64), ClusterShape(cpus=8, gpus=1), 256, "e"
    )
    apply_stage(ds, object, encode, fn_constructor_kwargs={"spec": 1})
    prepare = resolve_task_stage(StageResources(cpus=0.5), 64)
    apply_stage(ds, len, prepare, fn_kwargs={"spec": 1})
    (_, actor_kwargs), (_, task_kwargs) = ds.calls
    compute = actor_kwargs.pop("compute")
    assert isinstance(compute, ray.data.ActorPoolStrategy)
    assert (compute.min_size, compute.max_size) == (1, 2)
    assert actor_kwargs == {
        "batch_size": 64,
        "batch_format": "pyarrow",
        "num_cpus": 1.0,
        "num_gpus": 0.5,
        "memory": 2 << 30,
        "runtime_env": {"env_vars": {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:${GLIBC_TUNABLES}"}},
        "fn_constructor_kwargs": {"spec": 1},
    }
    assert "concurrency" not in actor_kwargs  # deprecated in favour of compute=
    assert task_kwargs == {"batch_size": 64, "batch_format": "pyarrow", "num_cpus": 0.5, "fn_kwargs": {"spec": 1}}


class _Pid:
    """An actor stage that records where it ran and its torch threads."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)

    def __call__(self, batch):
        import os

        import torch

        return batch.append_column(
            "actor_pid", __import__("pyarrow").array([os.getpid()] * batch.num_rows)
        ).append_column("threads", __import__("pyarrow").array([torch.get_num_threads()] * batch.num_rows))


def _task_pid(batch):
    import os

    import pyarrow as pa

    return batch.append_column("task_pid", pa.array([os.getpid()] * batch.num_rows))


def test_task_stage_is_not_fused_into_the_actor_with_equal_resources(ray_session):
    """A prepare task and an encode actor that both reserve one CPU: Ray Data would fuse them
    (equal remote args) and run prepare inside the actor, serially with the model. The adapter's
    runtime_env (the actor's malloc settings) keeps them apart, and the actor keeps its own torch
    threads."""
    import ray.data

    task = resolve_task_stage(StageResources(cpus=1), 4)
    actor = resolve_encode_stage(StageResources(cpus=1, threads=1), ClusterShape(cpus=2, gpus=0), 4, "e")
    ds = ray.data.range(16, override_num_blocks=4).map_batches(lambda b: b, batch_format="pyarrow")
    ds = apply_stage(ds, _task_pid, task)
    ds = apply_stage(ds, _Pid, actor, fn_constructor_kwargs={"threads": 1})
    rows = ds.take_all()
    assert len(rows) == 16 and {r["threads"] for r in rows} == {1}
    assert all(r["task_pid"] != r["actor_pid"] for r in rows)  # fused, both would run in the actor
    assert "_task_pid->" not in ds.stats() and "->MapBatches(_Pid)" not in ds.stats()


def _same(batch):
    return batch


class _Same:
    def __call__(self, batch):
        return batch


def test_stages_carry_their_names_into_ray_data(ray_session):
    """Each operator is named after its stage, so progress bars and ``stats()`` tell two
    encoders apart instead of showing two identical ``MapBatches(EncodeActor)``."""
    import ray.data

    task = resolve_task_stage(StageResources(cpus=0.5), 4)
    actor = resolve_encode_stage(StageResources(cpus=0.5, threads=1), ClusterShape(cpus=2, gpus=0), 4, "e")
    ds = ray.data.range(8, override_num_blocks=2).map_batches(lambda b: b, batch_format="pyarrow")
    for output in ("title", "photo"):
        ds = apply_stage(ds, _same, task, name=f"Prepare[{output}]")
        ds = apply_stage(ds, _Same, actor, name=f"Encode[{output}]")
    assert sorted(r["id"] for r in ds.take_all()) == list(range(8))
    stats = ds.stats()
    for name in ("Prepare[title]", "Encode[title]", "Prepare[photo]", "Encode[photo]"):
        assert f"MapBatches({name})" in stats, name


def test_named_stage_keeps_the_callable_and_its_arguments():
    ds = RecordingDataset()
    apply_stage(
        ds, _Pid, resolve_task_stage(StageResources(), 4), name="Encode[t]", fn_constructor_kwargs={"threads": 1}
    )
    apply_stage(ds, _task_pid, resolve_task_stage(StageResources(), 4), name="Prepare[t]")
    (actor, actor_kwargs), (task, _) = ds.calls
    assert (
        actor.__name__ == "Encode[t]"
        and issubclass(actor, _Pid)
        and actor_kwargs["fn_constructor_kwargs"] == {"threads": 1}
    )
    assert task.__name__ == "Prepare[t]"
    batch = __import__("pyarrow").table({"x": [1, 2]})
    assert task(batch).column("task_pid").to_pylist() == _task_pid(batch).column("task_pid").to_pylist()


def test_cpu_budgets_are_per_node_not_per_cluster():
    """100 x 16-core nodes: one CPU stays free on every node, not one in 1,600."""
    from pipeline.cluster import threads_for_node

    shape = ClusterShape(cpus=1600, gpus=0, node_cpus=(16.0,) * 100)
    stage = resolve_encode_stage(StageResources(), shape, 256, "e")
    assert (stage.num_cpus, stage.pool, stage.threads) == (1.0, (1, 1500), 1)  # 15 a node
    assert stage.node_threads() >= 1  # decided in the actor, from the node it runs on
    lstm = resolve_encode_stage(StageResources(), shape, 32, "e", actor_threads=1)
    assert lstm.pool == (16, 1600) and lstm.num_cpus * 16 <= 15 and lstm.threads == 1  # one node's worth first
    # Nodes of different sizes: each fits what its own budget holds; a 1-CPU node half a CPU.
    mixed = ClusterShape(cpus=19, gpus=0, node_cpus=(16.0, 2.0, 1.0))
    small = resolve_encode_stage(StageResources(cpus=0.5), mixed, 256, "e")
    assert small.pool == (1, 30 + 2 + 1)
    with pytest.raises(ConfigError, match="every CPU of a node"):
        resolve_encode_stage(StageResources(cpus=16), mixed, 256, "e")
    # Threads per node, in the actor: the node's cores over the actors its budget fits.
    assert threads_for_node(2, 1.0) == 2 and threads_for_node(16, 1.0) == 1 and threads_for_node(2, 0.5) == 1
    assert threads_for_node(16, 1.0, most_actors=1) == 16  # a pool of one uses the whole node
    assert threads_for_node(16, 1.0, encoders=2) == 1 and threads_for_node(1, 0.5) == 1


def test_node_threads_reads_the_node_ray_reports(ray_session):
    import ray

    from pipeline.cluster import NodeThreads, this_node_cpus, threads_for_node

    cpus = ray.cluster_resources()["CPU"]
    assert this_node_cpus() == cpus  # one local node, as Ray reports it
    assert NodeThreads(1.0)() == threads_for_node(cpus, 1.0) and NodeThreads(0.5, most_actors=1)() == int(cpus)


class _Faults:
    """An actor stage that, like an encoder, sets its allocator in the constructor and then, on
    Ray Data's UDF thread, allocates and frees a CNN stem's 100 MiB block batch after batch."""

    def __init__(self):
        from encoders.core.allocator import keep_freed_memory

        self.took = keep_freed_memory()

    def __call__(self, batch):
        import resource
        import threading

        import numpy as np
        import pyarrow as pa

        np.ones(25 << 20, dtype=np.float32)  # the first one is faulted in
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            np.ones(25 << 20, dtype=np.float32)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        main = threading.current_thread() is threading.main_thread()
        return pa.table({"faults": [faults], "took": [self.took], "main": [main]})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's arenas")
def test_an_actor_reuses_large_blocks_off_the_main_thread(ray_session):
    """The UDF thread's blocks come from the main arena (one arena per actor process), where the
    allocator keeps them: 20 blocks of 100 MiB fault a handful of pages, not one per 2 MiB page
    of each (50 a block with transparent huge pages; 25,600 with 4 KiB pages)."""
    import ray.data

    actor = resolve_encode_stage(StageResources(cpus=0.5, threads=1), ClusterShape(cpus=2, gpus=0), 1, "e")
    ds = ray.data.range(1, override_num_blocks=1).map_batches(lambda b: b, batch_format="pyarrow")
    (row,) = apply_stage(ds, _Faults, actor).take_all()
    assert row["took"] is True and row["main"] is False  # off the main thread, as Ray Data runs it
    assert row["faults"] < 20 * 10, row
