"""How planning work runs: Ray tasks in a run, a plain loop in tests and for tiny inputs.

Planning (listings, footers), the duplicate pass and resume accounting are written against
``Tasks``, so that they run without Ray in unit tests and as Ray tasks on a cluster.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence


class Tasks(Protocol):
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], local: bool = False) -> list[Any]:
        """``[fn(item) for item in items]``; ``local`` asks for the driver (a small job)."""

    def shuffle(
        self, map_fn: Callable[[Any, int], Sequence[Any]], reduce_fn: Callable[..., Any], items: Sequence[Any], n: int
    ) -> list[Any]:
        """A hash shuffle: ``map_fn(item, n)`` gives n partitions per item; ``reduce_fn`` gets
        partition p of every item and runs once per partition."""


class LocalTasks:
    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], local: bool = False) -> list[Any]:
        return [fn(item) for item in items]

    def shuffle(
        self, map_fn: Callable[[Any, int], Sequence[Any]], reduce_fn: Callable[..., Any], items: Sequence[Any], n: int
    ) -> list[Any]:
        mapped = [map_fn(item, n) for item in items]
        return [reduce_fn(*[parts[p] for parts in mapped]) for p in range(n)]


class RayTasks:
    """One Ray task per item. Partitions stay in the object store: the driver holds only
    references, map count x partition count of them, and the reducers' small results. Each
    task retries transient storage errors on the run's patterns (``retried_io_errors``)."""

    def __init__(self, retried_io_errors: Sequence[str] | None = None, num_cpus: float = 1.0) -> None:
        self.patterns = list(retried_io_errors) if retried_io_errors is not None else None
        self.num_cpus = num_cpus

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], local: bool = False) -> list[Any]:
        if local or not items:
            return [fn(item) for item in items]
        import ray

        remote = ray.remote(num_cpus=self.num_cpus)(_configured)
        return ray.get([remote.remote(self.patterns, fn, item) for item in items])

    def shuffle(
        self, map_fn: Callable[[Any, int], Sequence[Any]], reduce_fn: Callable[..., Any], items: Sequence[Any], n: int
    ) -> list[Any]:
        import ray

        if n == 1:  # one return is stored as one object: the partition, not a list of one
            mapper = ray.remote(num_cpus=self.num_cpus)(_configured)
            mapped = [[mapper.remote(self.patterns, _only_partition, map_fn, item, n)] for item in items]
        else:
            mapper = ray.remote(num_cpus=self.num_cpus, num_returns=n)(_configured)
            mapped = [mapper.remote(self.patterns, map_fn, item, n) for item in items]
        reducer = ray.remote(num_cpus=self.num_cpus)(_configured)
        return ray.get([reducer.remote(self.patterns, reduce_fn, *[parts[p] for parts in mapped]) for p in range(n)])


def _configured(patterns: list[str] | None, fn: Callable[..., Any], *args: Any) -> Any:
    from encoders.core.retry import configure

    configure(patterns)
    return fn(*args)


def _only_partition(map_fn: Callable[[Any, int], Sequence[Any]], item: Any, n: int) -> Any:
    return map_fn(item, n)[0]
