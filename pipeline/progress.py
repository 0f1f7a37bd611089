"""Resume accounting per read chunk, never per id.

Every committed part records how many rows of each read chunk it holds (``chunks``: key ->
rows). A chunk is done when its committed rows equal its planned rows (its rows less later
duplicates). Resume skips done chunks whole; a partly done chunk is read again, leaving out
the ids of the few parts that hold its key. The driver holds O(chunks + parts), whatever the
row count.

A committed key that is no longer planned means a file changed (size, modification time or
ETag) or a folder group changed. Its source is re-planned: the source's unfinished chunks
leave out the ids of the parts that hold the stale keys, counted exactly by tasks first. Past
``STALE_PARTS_LIMIT`` parts that would make every such task read too many parts, and the run
refuses in one line.
"""

from __future__ import annotations

import dataclasses
import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.chunks import ChunkPlan, source_of_key
from pipeline.config import ConfigError
from pipeline.dedupe import Duplicates
from pipeline.sources import ReadChunk, committed_ids, drop_rows, read_chunk
from pipeline.tasks import Tasks

STALE_PARTS_LIMIT = 256


@dataclass
class ReadPlan:
    chunks: pa.Table  # the chunks this run reads, with ``drops``, ``against`` and ``expect``
    schema: pa.Schema  # the read stage's schema
    rows: int  # input rows, before dedupe
    duplicates: int  # rows left out as later duplicates
    committed: int  # input rows an earlier run committed
    planned_chunks: int
    expect: dict[str, int] = field(default_factory=dict)  # key -> rows this run commits for it
    warnings: list[str] = field(default_factory=list)  # damaged input found by planning
    partners: pa.Table | None = None  # joined sources: the chunks merged rows take columns from
    # Chunks counted by their read (on_duplicate_id: trust): key -> (rows committed before, the
    # estimate ``rows`` holds until ``settled`` puts the count in its place)
    uncounted: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def to_embed(self) -> int:
        return self.rows - self.duplicates - self.committed

    @property
    def unique_rows(self) -> int:
        return self.rows - self.duplicates

    @property
    def row_bytes(self) -> int:
        """The largest mean row size, as read, of a chunk this run reads (0 for folder groups,
        whose rows are paths): stage batches and parts are sized by it (pipeline/plan.py)."""
        if not self.chunks.num_rows:
            return 0
        rows = pc.max_element_wise(self.chunks.column("rows"), 1)
        largest = pc.max(pc.divide(pc.cast(self.chunks.column("bytes"), pa.float64()), rows)).as_py()
        return int(largest or 0)

    def settled(self, totals: Mapping[str, int]) -> "ReadPlan":
        """After the read: the counts the read found, in place of the estimates."""
        delta = sum(totals[k] - estimate for k, (_, estimate) in self.uncounted.items() if k in totals)
        left = {k: v for k, v in self.uncounted.items() if k not in totals}
        return dataclasses.replace(self, rows=self.rows + delta, uncounted=left)

    def report(self) -> dict[str, Any]:
        """What ``--dry-run`` prints, with the driver's own peak RSS so far."""
        return {
            "rows": self.rows,
            "duplicates": self.duplicates,
            "committed": self.committed,
            "to_embed": self.to_embed,
            "chunks": self.planned_chunks,
            "chunks_to_read": self.chunks.num_rows,
            "driver_peak_rss_mb": round(peak_rss_kb() / 1024, 1),
            "warnings": self.warnings,
            **({"shards_counted_on_read": len(self.uncounted)} if self.uncounted else {}),
        }


def peak_rss_kb() -> int:
    """This process's own peak RSS (KiB): VmHWM on Linux. ``ru_maxrss`` is no good in a process
    started by a big one: it carries the parent's peak across fork and exec."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux and BSD report KiB


def account(
    plan: ChunkPlan, duplicates: Duplicates, records: Sequence[Mapping[str, Any]] | None, output: str, tasks: Tasks
) -> ReadPlan:
    """Which chunks this run reads, and how many rows of each it must commit."""
    chunks = plan.chunks
    keys = chunks.column("key").to_pylist()
    counts = chunks.column("rows").to_numpy().copy()
    counted = chunks.column("counted").fill_null(True).to_numpy(zero_copy_only=False).copy()
    committed: Counter[str] = Counter()
    parts_of: dict[str, list[str]] = {}
    totals: dict[str, int] = {}  # chunks counted by their read in an earlier run
    for record in records or ():
        for key, rows in record.get("chunks", {}).items():
            committed[key] += rows
            parts_of.setdefault(key, []).append(record["name"])
        totals.update(record.get("totals", {}))
    for i in np.flatnonzero(~counted):
        if keys[i] in totals:
            counts[i], counted[i] = totals[keys[i]], True
    planned = counts - pc.list_value_length(duplicates.drops).fill_null(0).to_numpy()
    stale = _stale_parts(committed.keys() - set(keys), parts_of, output)
    expect = planned.copy()
    against: list[list[str]] = [[] for _ in keys]
    recheck = []
    uncounted: dict[str, tuple[int, int]] = {}
    for i, key in enumerate(keys):
        done = committed.get(key, 0)
        source = source_of_key(key)
        if not counted[i]:  # read whole, counted by the read: never done before its count is known
            uncounted[key] = (done, int(planned[i]))
            against[i] = sorted(set(parts_of.get(key, ())) | stale.get(source, set()))
            expect[i] = max(int(planned[i]) - done, 1)
            continue
        if done == planned[i]:
            expect[i] = 0
            continue
        if done > planned[i]:
            relpath = chunks.column("relpath")[i].as_py()
            raise ConfigError(
                f"sources[{source}]: {relpath!r}: {output!r} holds {done} rows of a read chunk that now has "
                f"{planned[i]}; pass --overwrite to embed everything again"
            )
        parts = set(parts_of.get(key, ())) | stale.get(source, set())
        against[i] = sorted(parts)
        expect[i] = planned[i] - done
        if stale.get(source):
            recheck.append(i)
    if recheck:  # re-planned chunks: how many of their rows the stale parts already hold, by id
        jobs = [(chunks.slice(i, 1).to_pylist()[0], duplicates.drops[i].as_py(), against[i], output) for i in recheck]
        for i, already in zip(recheck, tasks.map(count_committed, jobs)):
            expect[i] = planned[i] - already
    reading = expect > 0
    index = pa.array(np.flatnonzero(reading))
    table = chunks.take(index)
    table = table.append_column("drops", duplicates.drops.take(index))
    partners = None
    if duplicates.partner_pos is not None:  # sources joined by id: where each merged row's columns are
        table = table.append_column("partner_rows", duplicates.partner_rows.take(index))
        table = table.append_column("partner_pos", duplicates.partner_pos.take(index))
        ordinals = np.unique(duplicates.partner_pos.flatten().to_numpy() >> 32)
        partners = chunks.take(pa.array(ordinals, pa.int64())).append_column("ordinal", pa.array(ordinals, pa.int64()))
    table = table.append_column("against", pa.array(against, pa.list_(pa.string())).take(index))
    table = table.append_column("expect", pa.array(expect[reading], pa.int64()))
    return ReadPlan(
        chunks=table,
        schema=plan.schema,
        rows=int(counts.sum()),
        duplicates=duplicates.count,
        committed=int((planned - expect)[counted].sum()) + sum(done for done, _ in uncounted.values()),
        planned_chunks=chunks.num_rows,
        expect={
            k: n
            for k, n in zip(table.column("key").to_pylist(), table.column("expect").to_pylist())
            if k not in uncounted
        },
        uncounted=uncounted,
        warnings=list(plan.warnings),
        partners=partners,
    )


def _stale_parts(stale_keys: set[str], parts_of: Mapping[str, list[str]], output: str) -> dict[int, set[str]]:
    by_source: dict[int, set[str]] = {}
    keys_of: Counter[int] = Counter()
    for key in stale_keys:
        source = source_of_key(key)
        by_source.setdefault(source, set()).update(parts_of[key])
        keys_of[source] += 1
    for source, parts in sorted(by_source.items()):
        if len(parts) > STALE_PARTS_LIMIT:
            raise ConfigError(
                f"sources[{source}]: {keys_of[source]} read chunks changed since the run that wrote {output!r} "
                f"({len(parts)} committed parts hold them); restore the files, or pass --overwrite"
            )
    return by_source


def count_committed(job: tuple[dict[str, Any], list[int] | None, list[str], str]) -> int:
    """A task: how many rows of a chunk (less its dropped duplicates) some parts already hold."""
    row, drops, parts, output = job
    ids = drop_rows(read_chunk(ReadChunk.from_row(row), columns=[]).column("id"), drops)
    return int(pc.sum(pc.is_in(ids, value_set=committed_ids(output, parts))).as_py() or 0)
