"""Sources joined by id: the duplicate pass and the join in one hash-partitioned shuffle of ids.

Sources without ``join`` are the base: their rows are the output's rows, as without joins (a
later duplicate among them follows ``on_duplicate_id``). Each source with ``join: left | inner
| outer`` is matched by id, in config order, to what the sources above it give:

- ``left``: the ids above stay; a matching row adds its columns, the others are left out;
- ``inner``: only ids above that the joined source holds stay;
- ``outer``: ids in either; an id only the joined source holds becomes a row of its own.

Only ids and positions (chunk ordinal << 32 | row) move: reduce task p sees every occurrence of
the ids of partition p, and returns which positions leave their chunk (duplicates, and the rows
merged into another) and, per merged row, which row it joins: (driver position, partner
position). The read task of a driving chunk then fetches its partners' columns from their
chunks (pipeline/sources.py): no media bytes are shuffled, and no table of all rows is built on
the driver. The kept rows per chunk are the planned counts that resume and the exactly-once
check use, as for duplicates.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError, SourceConfig
from pipeline.dedupe import ROW_BITS, SAMPLES, Duplicates, map_runs, partition_ids
from pipeline.sources import ReadChunk, read_chunk
from pipeline.tasks import Tasks

IDS_PER_TASK = 2_000_000


def roles(sources: Sequence[SourceConfig]) -> tuple[list[int], list[str]]:
    """Per source its role (0: a base source; j: the j-th joined source) and the modes by role."""
    role, modes = [], [""]
    for source in sources:
        if source.join:
            modes.append(source.join)
            role.append(len(modes) - 1)
        else:
            role.append(0)
    return role, modes


def find_duplicates_and_joins(
    chunks: pa.Table,
    sources: Sequence[SourceConfig],
    on_duplicate_id: str,
    tasks: Tasks,
    ids_per_task: int = IDS_PER_TASK,
) -> Duplicates:
    source_role, modes = roles(sources)
    chunk_role = np.array([source_role[s] for s in chunks.column("source").to_pylist()], np.int64)
    runs, partitions = map_runs(chunks, ids_per_task)
    reduce = _JoinReduce(chunk_role, modes, on_duplicate_id)
    results = tasks.shuffle(partition_ids, reduce, runs, partitions)
    repeated = sum(r["ids"] for r in results)
    if repeated and on_duplicate_id == "error":
        sample = ", ".join(repr(i) for i in sorted(i for r in results for i in r["sample"])[:SAMPLES])
        raise ConfigError(
            f"sources: {repeated} ids occur more than once within a source (e.g. {sample}); fix the input or set "
            "output.on_duplicate_id: keep-first"
        )
    drops = np.sort(np.concatenate([r["drops"] for r in results] + [np.empty(0, np.int64)]))
    pairs = np.concatenate([r["pairs"] for r in results] + [np.empty((0, 2), np.int64)])
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    n = chunks.num_rows
    mask = (1 << ROW_BITS) - 1
    drop_lists = _per_chunk(drops >> ROW_BITS, pa.array((drops & mask).astype(np.int32)), n)
    partner_rows = _per_chunk(pairs[:, 0] >> ROW_BITS, pa.array((pairs[:, 0] & mask).astype(np.int32)), n)
    partner_pos = _per_chunk(pairs[:, 0] >> ROW_BITS, pa.array(pairs[:, 1], pa.int64()), n)
    # Every row left out counts against the planned rows: later duplicates, rows merged into
    # another row, and rows a join leaves out.
    return Duplicates(drop_lists, len(drops), repeated, partner_rows, partner_pos)


def _per_chunk(ordinals: np.ndarray, values: pa.Array, n: int) -> pa.ListArray:
    offsets = np.searchsorted(ordinals, np.arange(n + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


class _JoinReduce:
    """A reduce task over one partition of every map: per id, its occurrences by role."""

    def __init__(self, chunk_role: np.ndarray, modes: list[str], on_duplicate_id: str) -> None:
        self.chunk_role, self.modes, self.policy = chunk_role, modes, on_duplicate_id

    def __call__(self, *parts: pa.Table) -> dict:
        table = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string()), "pos": []})
        grouped = table.group_by("id").aggregate([("pos", "list")])
        drops: list[int] = []
        pairs: list[tuple[int, int]] = []
        repeated, duplicates, sample = 0, 0, []
        for key, positions in zip(grouped.column("id").to_pylist(), grouped.column("pos_list").to_pylist()):
            positions.sort()
            first: dict[int, int] = {}
            seen: Counter[int] = Counter()
            for pos in positions:
                role = int(self.chunk_role[pos >> ROW_BITS])
                seen[role] += 1
                if role in first:
                    drops.append(pos)  # a later duplicate within one role
                    duplicates += 1
                else:
                    first[role] = pos
            if any(c > 1 for c in seen.values()):
                repeated += 1
                if len(sample) < SAMPLES:
                    sample.append(key)
            kept = 0 in first
            for role in range(1, len(self.modes)):
                if self.modes[role] == "inner":
                    kept = kept and role in first
                elif self.modes[role] == "outer":
                    kept = kept or role in first
            ordered = [first[r] for r in sorted(first)]
            if not kept:
                drops += ordered
                continue
            driver, partners = ordered[0], ordered[1:]
            drops += partners
            pairs += [(driver, p) for p in partners]
        return {
            "drops": np.array(drops, np.int64),
            "pairs": np.array(pairs, np.int64).reshape(-1, 2),
            "ids": repeated,
            "duplicates": duplicates,
            "sample": sample,
        }


def id_pass(chunks: pa.Table, sources: Sequence[SourceConfig], on_duplicate_id: str, tasks: Tasks) -> Duplicates:
    """The duplicate pass, and the join where a source joins by id."""
    from pipeline.dedupe import find_duplicates

    if any(s.join for s in sources):
        return find_duplicates_and_joins(chunks, sources, on_duplicate_id, tasks)
    return find_duplicates(chunks, on_duplicate_id, tasks)


def with_partners(table: pa.Table, rows: list[int], positions: list[int], partners: pa.Table) -> pa.Table:
    """A driving chunk's rows with the columns of the rows joined to them (null where none)."""
    import pyarrow.compute as pc

    mask = (1 << ROW_BITS) - 1
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for row, pos in zip(rows, positions):
        by_chunk.setdefault(pos >> ROW_BITS, []).append((row, pos & mask))
    where = {ordinal: i for i, ordinal in enumerate(partners.column("ordinal").to_pylist())}
    for ordinal, items in sorted(by_chunk.items()):
        chunk = ReadChunk.from_row(partners.slice(where[ordinal], 1).to_pylist()[0])
        picked = _partner_table(chunk).take(pa.array([r for _, r in items], pa.int64())).drop_columns(["id"])
        spread = [None] * table.num_rows
        for k, (row, _) in enumerate(items):
            spread[row] = k
        placed = picked.take(pa.array(spread, pa.int64()))  # null rows where no partner
        for name in placed.column_names:
            if name in table.column_names:
                index = table.column_names.index(name)
                table = table.set_column(index, name, pc.coalesce(table.column(name), placed.column(name)))
            else:
                table = table.append_column(name, placed.column(name))
    return table


@functools.lru_cache(maxsize=4)
def _partner_table(chunk: ReadChunk) -> pa.Table:
    """A joined chunk's rows, kept for the next driving chunks this worker reads: a captions file
    is read once per worker process, not once per photo group."""
    return read_chunk(chunk)
