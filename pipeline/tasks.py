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
    references, map count x partition count of them, and the reducers' small results."""

    def __init__(self, num_cpus: float = 1.0) -> None:
        self.num_cpus = num_cpus

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], local: bool = False) -> list[Any]:
        if local or not items:
            return [fn(item) for item in items]
        import ray

        remote = ray.remote(num_cpus=self.num_cpus)(fn)
        return ray.get([remote.remote(item) for item in items])

    def shuffle(
        self, map_fn: Callable[[Any, int], Sequence[Any]], reduce_fn: Callable[..., Any], items: Sequence[Any], n: int
    ) -> list[Any]:
        import ray

        if n == 1:  # one return is stored as one object: the partition, not a list of one
            mapper = ray.remote(num_cpus=self.num_cpus)(_only_partition)
            mapped = [[mapper.remote(map_fn, item, n)] for item in items]
        else:
            mapper = ray.remote(num_cpus=self.num_cpus, num_returns=n)(map_fn)
            mapped = [mapper.remote(item, n) for item in items]
        reducer = ray.remote(num_cpus=self.num_cpus)(reduce_fn)
        return ray.get([reducer.remote(*[parts[p] for parts in mapped]) for p in range(n)])


def _only_partition(map_fn: Callable[[Any, int], Sequence[Any]], item: Any, n: int) -> Any:
    return map_fn(item, n)[0]
