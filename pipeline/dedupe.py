"""The duplicate pass: ids are hash-partitioned across tasks; only duplicates reach the driver.

Map tasks read the ids of a run of chunks and split them by ``crc32(id) % n``; reduce task p
groups partition p of every map. Each task holds at most about ``IDS_PER_TASK`` ids, so the
partition count grows with the rows. A row's position (chunk ordinal << 32 | row) orders
``keep-first``: first by source, then file, then row. ``on_duplicate_id: trust`` skips the pass.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import ConfigError
from pipeline.sources import ReadChunk, read_chunk
from pipeline.tasks import Tasks

IDS_PER_TASK = 2_000_000
ROW_BITS = 32
SAMPLES = 3


@dataclass
class Duplicates:
    drops: pa.ListArray  # per chunk, the rows a keep-first run leaves out (later duplicates)
    count: int  # rows left out
    ids: int  # distinct ids that occur more than once
    # Sources joined by id (pipeline/joins.py): per chunk, its rows that take another row's
    # columns, and that row's position (chunk ordinal << 32 | row). None without joins.
    partner_rows: pa.ListArray | None = None
    partner_pos: pa.ListArray | None = None


def find_duplicates(
    chunks: pa.Table, on_duplicate_id: str, tasks: Tasks, ids_per_task: int = IDS_PER_TASK
) -> Duplicates:
    none = pa.array([[]] * chunks.num_rows, pa.list_(pa.int32()))
    if on_duplicate_id == "trust" or not chunks.num_rows:
        return Duplicates(none, 0, 0)
    runs, partitions = map_runs(chunks, ids_per_task)
    results = tasks.shuffle(partition_ids, duplicates_in, runs, partitions)
    ids = sum(r["ids"] for r in results)
    positions = np.sort(np.concatenate([r["drops"] for r in results] + [np.empty(0, np.int64)]))
    ordinals = positions >> ROW_BITS
    if ids and on_duplicate_id == "error":
        sample = ", ".join(repr(i) for i in sorted(i for r in results for i in r["sample"])[:SAMPLES])
        dup_chunks = chunks.take(pa.array(np.unique(ordinals)))
        # A WebDataset sample's key is its id as given, not one derived from a path.
        derived_ids = pc.and_(
            pc.is_null(dup_chunks.column("id_column")), pc.not_equal(dup_chunks["format"], "webdataset")
        )
        derived = pc.any(derived_ids).as_py()
        # keep-first would silently drop a whole file whose derived ids repeat another's
        fix = (
            "ids derived from file paths repeat: give the sources an id_column"
            if derived
            else "fix the input or set output.on_duplicate_id: keep-first"
        )
        raise ConfigError(f"sources: {ids} ids occur more than once (e.g. {sample}); {fix}")
    offsets = np.searchsorted(ordinals, np.arange(chunks.num_rows + 1)).astype(np.int32)
    values = pa.array((positions & ((1 << ROW_BITS) - 1)).astype(np.int32))
    return Duplicates(pa.ListArray.from_arrays(pa.array(offsets), values), len(positions), ids)


def map_runs(chunks: pa.Table, ids_per_task: int) -> tuple[list[tuple[int, pa.Table]], int]:
    """Runs of consecutive chunks of at most ``ids_per_task`` ids (the map tasks' inputs), and
    the partition count that keeps a reduce task near that many ids."""
    rows = chunks.column("rows").to_numpy()
    partitions = max(1, math.ceil(int(rows.sum()) / ids_per_task))
    runs, start, held = [], 0, 0
    for i, count in enumerate(rows):
        if held and held + count > ids_per_task:
            runs.append((start, chunks.slice(start, i - start)))
            start, held = i, 0
        held += int(count)
    runs.append((start, chunks.slice(start, chunks.num_rows - start)))
    return runs, partitions


def partition_ids(run: tuple[int, pa.Table], n: int) -> list[pa.Table]:
    """A map task: (id, position) of every row of a run of chunks, split into n partitions."""
    start, table = run
    ids, positions = [], []
    for offset, row in enumerate(table.to_pylist()):
        chunk = ReadChunk.from_row(row)
        column = read_chunk(chunk, columns=[]).column("id").combine_chunks()
        ids.append(column)
        positions.append(((start + offset) << ROW_BITS) + np.arange(len(column), dtype=np.int64))
    id_array = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
    position = np.concatenate(positions) if positions else np.empty(0, np.int64)
    part = np.fromiter(
        (zlib.crc32(value) % n for value in id_array.cast(pa.binary()).to_pylist()), np.int64, len(id_array)
    )
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n + 1))
    table = pa.table({"id": id_array.take(pa.array(order)), "pos": pa.array(position[order])})
    return [table.slice(bounds[p], bounds[p + 1] - bounds[p]) for p in range(n)]


def duplicates_in(*parts: pa.Table) -> dict:
    """A reduce task: one partition of every map. Returns the positions of later duplicates
    (all but the first of each id), how many ids repeat, and a few of them."""
    table = pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string()), "pos": []})
    counts = table.group_by("id").aggregate([("pos", "min"), ("pos", "count")])
    repeated = counts.filter(pc.greater(counts["pos_count"], 1))
    if not repeated.num_rows:
        return {"drops": np.empty(0, np.int64), "ids": 0, "sample": []}
    firsts = repeated.column("pos_min")
    candidates = table.filter(pc.is_in(table["id"], value_set=repeated["id"]))
    later = candidates.filter(pc.invert(pc.is_in(candidates["pos"], value_set=firsts)))
    return {
        "drops": later.column("pos").to_numpy(),
        "ids": repeated.num_rows,
        "sample": repeated.column("id").slice(0, SAMPLES).to_pylist(),
    }
