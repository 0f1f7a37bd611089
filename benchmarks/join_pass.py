"""The id pass with a joined source against the duplicate pass alone: one reduce task's time on
the same ids (pipeline/joins.py against pipeline/dedupe.py), measured in this run.

A reduce task holds about IDS_PER_TASK (2M) ids: here N base ids (a photo folder) and N joined
ids (its captions), of which a share matches. The duplicate pass is vectorized (Arrow group-by);
the join pass decides per id in Python. The ratio says what a join costs per reduce task; tasks
run in parallel across the cluster, one per 2M ids.

    python benchmarks/join_pass.py [--ids 1000000] [--match 0.9] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa

from pipeline.dedupe import ROW_BITS, duplicates_in
from pipeline.joins import _JoinReduce


def partition(n: int, match: float) -> tuple[pa.Table, np.ndarray, int]:
    """One reduce partition: n base ids in chunk 0.., n joined ids in chunk 1000.. (role 1)."""
    rng = np.random.default_rng(0)
    base = [f"photos/{i:09d}.jpg" for i in range(n)]
    matched = rng.random(n) < match
    joined = [base[i] if matched[i] else f"orphans/{i:09d}.jpg" for i in range(n)]
    chunk_base = np.arange(n) // 1024
    chunk_joined = 1000 + np.arange(n) // 1024
    pos = np.concatenate(
        [(chunk_base << ROW_BITS) + np.arange(n) % 1024, (chunk_joined << ROW_BITS) + np.arange(n) % 1024]
    )
    roles = np.zeros(int(chunk_joined.max()) + 1, np.int64)
    roles[1000:] = 1
    table = pa.table({"id": pa.array(base + joined, pa.string()), "pos": pa.array(pos, pa.int64())})
    return table, roles, int(matched.sum())


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000, help="base ids (and as many joined ids)")
    parser.add_argument("--match", type=float, default=0.9, help="share of joined ids that match a base id")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    table, roles, matched = partition(args.ids, args.match)
    dedupe = best(lambda: duplicates_in(table), args.repeat)
    join = _JoinReduce(roles, ["", "left"], "error")
    result = join(table)
    if len(result["pairs"]) != matched:  # every matching caption joins its photo, once
        raise SystemExit(f"join pass gave {len(result['pairs'])} pairs, expected {matched}")
    joined = best(lambda: join(table), args.repeat)
    print(f"ids per reduce task: {2 * args.ids:,} ({args.match:.0%} of the joined ids match)")
    print(f"duplicate pass reduce: {dedupe:.2f} s")
    print(f"join pass reduce:      {joined:.2f} s  ({joined / dedupe:.1f}x the duplicate pass)")
    print(f"join pass rate:        {2 * args.ids / joined:,.0f} ids/s per task")


if __name__ == "__main__":
    main()
