"""``python -m jobs.recommend``: a two-tower recommender on interactions and omniembed item vectors.

    python -m jobs.recommend --interactions examples/jobs/data/interactions.parquet \\
        --items examples/out/items --column text_embedding --time-column time --output examples/out/recommend

- Interactions: user and item ids, optionally a rating (``--min-rating`` keeps the positives)
  and a time (the split then holds out each user's latest interactions; else a seeded random
  share). Items without a vector in the column are dropped and counted.
- The model (jobs/two_tower.py) trains with Ray Train: id embedding tables, the content vectors
  concatenated into the item tower (or as its initialization), dropout, AdamW weight decay,
  validation recall@k each epoch and early stopping.
- Reported on held-out interactions: recall@k and NDCG@k of the model, of popularity, and of a
  content-only recommender (a user is the mean of their items' vectors).
- Written to ``--output``: ``recommendations.parquet`` (user_id, item_ids, scores: the top k
  unseen items), ``user_embeddings.parquet``, ``item_embeddings.parquet`` and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.entrypoint import EXIT_OK, JobError, job_parser, run_job, start_ray
from jobs.ranking import UserItems, content_scorer, evaluate_scores, popularity_scorer, top_k
from jobs.summary import print_facts, print_table
from jobs.tables import read_table
from jobs.trainer import TrainSettings, add_fit_flags, fit
from jobs.two_tower import ITEM_TOWERS, build_model, train_loop
from jobs.vectors import read_vectors

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Interactions as (user, item) rows, split per user into train / validation / test."""

    user_ids: np.ndarray  # (n_users,) str
    item_ids: np.ndarray  # (n_items,) str: rows of the content matrix
    train: UserItems
    val: UserItems
    test: UserItems
    dropped_unknown: int
    dropped_rating: int


def load_interactions(args: argparse.Namespace, item_ids: np.ndarray) -> Split:
    columns = [args.user_column, args.item_column] + [c for c in (args.rating_column, args.time_column) if c]
    table = read_table(args.interactions, "--interactions", columns)
    if args.rating_column is None and args.min_rating is not None:
        raise JobError("--min-rating needs --rating-column")
    dropped_rating = 0
    if args.min_rating is not None:
        keep = pc.greater_equal(table.column(args.rating_column), args.min_rating)
        dropped_rating = table.num_rows - int(pc.sum(keep).as_py() or 0)
        table = table.filter(keep)
    item_row = {id_: i for i, id_ in enumerate(item_ids.tolist())}
    items = np.array([item_row.get(str(v), -1) for v in table.column(args.item_column).to_pylist()], dtype=np.int64)
    known = items >= 0
    users_raw = np.array([str(v) for v in table.column(args.user_column).to_pylist()], dtype=object)[known]
    times = (
        table.column(args.time_column).to_numpy(zero_copy_only=False)[known]
        if args.time_column
        else np.zeros(int(known.sum()))
    )
    items = items[known]
    if not len(items):
        raise JobError(f"--interactions: no interaction names an item that has a vector in --items {args.items!r}")
    user_ids, users = np.unique(users_raw, return_inverse=True)
    # One row per (user, item): the first occurrence (by time when given).
    order = np.lexsort((times, items, users))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (users[order][1:] != users[order][:-1]) | (items[order][1:] != items[order][:-1])
    users, items, times = users[order][first], items[order][first], times[order][first]
    part = split_rows(users, times, args.test_share, args.val_share, args.seed, by_time=bool(args.time_column))
    n = len(user_ids)
    return Split(
        user_ids,
        item_ids,
        *(UserItems.from_pairs(users[part == p], items[part == p], n) for p in range(3)),
        dropped_unknown=int((~known).sum()),
        dropped_rating=dropped_rating,
    )


def split_rows(
    users: np.ndarray, times: np.ndarray, test_share: float, val_share: float, seed: int, by_time: bool
) -> np.ndarray:
    """Per user: 0 train, 1 validation, 2 test. The latest (or random) shares are held out;
    users with fewer than 3 interactions stay in train."""
    rng = np.random.default_rng(seed)
    keys = times if by_time else rng.random(len(users))
    part = np.zeros(len(users), dtype=np.int8)
    order = np.lexsort((keys, users))
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for rows in np.split(order, bounds):
        if len(rows) < 3:
            continue
        n_test = max(1, int(round(test_share * len(rows))))
        n_val = max(1, int(round(val_share * len(rows))))
        part[rows[len(rows) - n_test :]] = 2
        part[rows[len(rows) - n_test - n_val : len(rows) - n_test]] = 1
    return part


def _body(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.item_tower not in ITEM_TOWERS:
        raise JobError(f"--item-tower: {args.item_tower!r} is not valid; valid values: {', '.join(ITEM_TOWERS)}")
    vectors = read_vectors(args.items, args.column)
    split = load_interactions(args, vectors.ids)
    content = vectors.vectors
    k = args.k
    seen_before_test = split.train.merged(split.val)
    test_users = split.test.users_with_items()
    if not len(test_users):
        raise JobError("--interactions: no user has 3 or more interactions, so nothing can be held out")
    baselines = {
        "popularity": evaluate_scores(
            popularity_scorer(seen_before_test, len(split.item_ids)), test_users, seen_before_test, split.test, k
        ),
        "content only": evaluate_scores(
            content_scorer(seen_before_test, content), test_users, seen_before_test, split.test, k
        ),
    }
    start_ray(args.address)
    import ray

    train_pairs = _pairs(split.train)
    data = {
        "train_users": train_pairs[0],
        "train_items": train_pairs[1],
        "train_seen": (split.train.indptr, split.train.items),
        "val_held": (split.val.indptr, split.val.items),
        "content": content if args.item_tower != "ids" else None,
    }
    model_spec = {
        "n_users": len(split.user_ids),
        "n_items": len(split.item_ids),
        "dim": args.dim,
        "mode": args.item_tower,
        "dropout": args.dropout,
    }
    config = {
        "data": [ray.put(data)],
        "model": model_spec,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "patience": args.patience,
        "k": k,
        "seed": args.seed,
    }
    metrics, payload = fit(train_loop, config, TrainSettings.from_args(args), "omniembed-recommend")
    model = build_model(model_spec, data["content"])
    model.load_state_dict(payload["state"])
    model.eval()
    import torch

    with torch.no_grad():
        item_vectors = model.item_vectors()
        user_vectors = model.user_vectors(torch.arange(len(split.user_ids)))
    score = lambda users: user_vectors[torch.from_numpy(users)] @ item_vectors.T  # noqa: E731
    results = {
        f"two-tower ({args.item_tower})": evaluate_scores(score, test_users, seen_before_test, split.test, k),
        **baselines,
    }
    everything = seen_before_test.merged(split.test)
    all_users = np.arange(len(split.user_ids))
    ranked, scores = top_k(score(all_users), all_users, everything, k)
    _write_outputs(
        args.output,
        split,
        ranked,
        scores,
        user_vectors.numpy(),
        item_vectors.numpy(),
        results,
        payload,
        k,
        vectors.nulls,
    )
    print_table(
        f"jobs.recommend: held-out interactions of {len(test_users):,} users (k={k})",
        ["method", f"recall@{k}", f"ndcg@{k}"],
        [[name, r, n] for name, (r, n) in results.items()],
    )
    model_recall = results[f"two-tower ({args.item_tower})"][0]
    print_facts(
        "summary",
        [
            ("users / items", f"{len(split.user_ids):,} / {len(split.item_ids):,}"),
            (
                "interactions train / val / test",
                f"{len(split.train.items):,} / {len(split.val.items):,} / {len(split.test.items):,}",
            ),
            ("dropped: item without vector", split.dropped_unknown),
            ("dropped: below --min-rating", split.dropped_rating),
            ("items with null vectors (not in catalog)", vectors.nulls),
            ("epochs run (best)", f"{metrics.get('epochs_run')} ({metrics.get('best_epoch')})"),
            (f"model - popularity recall@{k}", model_recall - results["popularity"][0]),
            ("output", args.output),
            ("seconds", f"{time.perf_counter() - started:.1f}"),
        ],
    )
    return EXIT_OK


def _pairs(items: UserItems) -> tuple[np.ndarray, np.ndarray]:
    users = np.repeat(np.arange(len(items.indptr) - 1), np.diff(items.indptr)).astype(np.int64)
    return users, items.items.astype(np.int64)


def _write_outputs(
    output: str,
    split: Split,
    ranked: np.ndarray,
    scores: np.ndarray,
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    results: dict[str, tuple[float, float]],
    payload: dict[str, Any],
    k: int,
    null_items: int,
) -> None:
    import pyarrow.parquet as pq

    from pipeline.columns import vectors_to_arrow
    from pipeline.filesystems import join, open_filesystem

    fs, root = open_filesystem(output)
    fs.create_dir(root, recursive=True)
    recs = pa.table(
        {
            "user_id": pa.array(split.user_ids.tolist(), pa.string()),
            "item_ids": pa.array([split.item_ids[r].tolist() for r in ranked], pa.list_(pa.string())),
            "scores": pa.array([s.tolist() for s in scores], pa.list_(pa.float32())),
        }
    )
    every = np.ones(len(user_vectors), dtype=bool)
    tables = {
        "recommendations.parquet": recs,
        "user_embeddings.parquet": pa.table(
            {"id": split.user_ids.tolist(), "embedding": vectors_to_arrow(user_vectors, every)}
        ),
        "item_embeddings.parquet": pa.table(
            {
                "id": split.item_ids.tolist(),
                "embedding": vectors_to_arrow(item_vectors, np.ones(len(item_vectors), bool)),
            }
        ),
    }
    for name, table in tables.items():
        with fs.open_output_stream(join(root, name)) as stream:
            pq.write_table(table, stream)
    report = {
        "k": k,
        "metrics": {name: {f"recall@{k}": r, f"ndcg@{k}": n} for name, (r, n) in results.items()},
        "history": payload["history"],
        "null_items": null_items,
    }
    with fs.open_output_stream(join(root, "metrics.json")) as stream:
        stream.write(json.dumps(report, indent=2).encode())


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("jobs.recommend", __doc__)
    parser.add_argument("--interactions", required=True, help="Parquet/JSONL/CSV file or folder of interactions")
    parser.add_argument("--items", required=True, help="omniembed output folder with the items' vectors (id = item id)")
    parser.add_argument("--column", required=True, help="the items' vector column, e.g. text_embedding")
    parser.add_argument("--output", required=True, help="folder for recommendations, embeddings and metrics.json")
    parser.add_argument("--user-column", default="user_id", help="(default user_id)")
    parser.add_argument("--item-column", default="item_id", help="(default item_id)")
    parser.add_argument("--rating-column", help="rating column (used with --min-rating)")
    parser.add_argument("--min-rating", type=float, help="keep interactions rated at least this (positives)")
    parser.add_argument("--time-column", help="time column: hold out each user's latest interactions")
    parser.add_argument("--test-share", type=float, default=0.2, help="held-out share per user (default 0.2)")
    parser.add_argument("--val-share", type=float, default=0.1, help="validation share per user (default 0.1)")
    parser.add_argument("-k", type=int, default=10, help="k of recall@k, NDCG@k and the recommendations (default 10)")
    model = parser.add_argument_group("model")
    model.add_argument("--item-tower", default="concat", help=f"{' | '.join(ITEM_TOWERS)} (default concat)")
    model.add_argument("--dim", type=int, default=64, help="embedding size (default 64)")
    model.add_argument("--dropout", type=float, default=0.2, help="(default 0.2)")
    model.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    return add_fit_flags(parser, model, lr="5e-3", epochs=40, metric="recall@k")


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("jobs.recommend", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
