"""``python -m jobs.fraud``: a fraud classifier on transactions and omniembed content vectors.

    python -m jobs.fraud --transactions examples/jobs/data/transactions.parquet \\
        --categorical merchant_id,device,country,channel --numeric amount,hour --label label \\
        --vectors examples/out/items --column text_embedding --vectors-key item_id

- Each transaction's content vector is the row of ``--vectors`` whose id equals its
  ``--vectors-key`` value (e.g. the item bought, or the merchant); transactions without one get a
  zero vector and a flag, and are counted.
- The classifier (jobs/fraud_model.py) trains with Ray Train twice in one run: with the content
  vectors, and without them, so that their value is measured.
- An unsupervised baseline: an isolation forest (no labels) on the content vectors and the
  numeric fields, and on the numeric fields alone.
- Reported on a held-out test split: ROC-AUC and PR-AUC (average precision) of each; the
  positive rate is PR-AUC's chance level. ``--output`` gets test scores and ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from jobs.entrypoint import EXIT_OK, JobError, job_parser, run_job, start_ray
from jobs.fraud_model import build_model, predict, train_loop
from jobs.summary import print_facts, print_table
from jobs.tables import read_table
from jobs.trainer import TrainSettings, add_fit_flags, fit
from jobs.vectors import read_vectors

log = logging.getLogger(__name__)
WITH, WITHOUT = "with content vectors", "without content vectors"


def _names(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def split_rows(
    labels: np.ndarray, times: np.ndarray | None, val_share: float, test_share: float, seed: int
) -> np.ndarray:
    """0 train, 1 validation, 2 test: the latest rows by time, else a seeded split stratified by label."""
    part = np.zeros(len(labels), dtype=np.int8)
    if times is not None:
        order = np.argsort(times, kind="stable")
        n_test, n_val = int(round(test_share * len(order))), int(round(val_share * len(order)))
        part[order[len(order) - n_test :]] = 2
        part[order[len(order) - n_test - n_val : len(order) - n_test]] = 1
        return part
    rng = np.random.default_rng(seed)
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        n_test, n_val = int(round(test_share * len(rows))), int(round(val_share * len(rows)))
        part[rows[:n_test]] = 2
        part[rows[n_test : n_test + n_val]] = 1
    return part


def encode_categorical(columns: list[list[Any]], train: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Each field's values -> 1..cardinality by the training rows' vocabulary; 0 for unseen."""
    codes, sizes = [], []
    for values in columns:
        vocab: dict[Any, int] = {}
        for value in (v for v, t in zip(values, train) if t):
            vocab.setdefault(value, len(vocab) + 1)
        codes.append(np.array([vocab.get(v, 0) for v in values], dtype=np.int64))
        sizes.append(len(vocab))
    return np.stack(codes, axis=1), sizes


def encode_numeric(columns: list[np.ndarray], train: np.ndarray) -> np.ndarray:
    """Missing -> the training median; then standardized by the training rows."""
    out = []
    for values in columns:
        values = values.astype(np.float64)
        median = np.nanmedian(values[train]) if np.isfinite(values[train]).any() else 0.0
        values = np.where(np.isfinite(values), values, median)
        std = values[train].std() or 1.0
        out.append((values - values[train].mean()) / std)
    return np.stack(out, axis=1).astype(np.float32) if out else np.zeros((len(train), 0), np.float32)


def _body(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    categorical, numeric = _names(args.categorical), _names(args.numeric)
    if not categorical and not numeric:
        raise JobError("--categorical or --numeric: give at least one field")
    required = [args.label, args.vectors_key, *categorical, *numeric] + ([args.time_column] if args.time_column else [])
    table = read_table(args.transactions, "--transactions", list(dict.fromkeys(required)))
    labels = np.asarray([int(bool(v)) for v in table.column(args.label).to_pylist()], dtype=np.int64)
    if labels.min() == labels.max():
        raise JobError(f"--label {args.label!r}: every transaction has the same label; nothing to learn")
    vectors = read_vectors(args.vectors, args.column)
    row_of = {id_: i for i, id_ in enumerate(vectors.ids.tolist())}
    keys = [None if v is None else str(v) for v in table.column(args.vectors_key).to_pylist()]
    rows = np.array([row_of.get(k, -1) for k in keys], dtype=np.int64)
    has_content = rows >= 0
    content = np.zeros((len(rows), vectors.dim), np.float32)
    content[has_content] = vectors.vectors[rows[has_content]]
    times = table.column(args.time_column).to_numpy(zero_copy_only=False) if args.time_column else None
    part = split_rows(labels, times, args.val_share, args.test_share, args.seed)
    train = part == 0
    codes, sizes = encode_categorical([table.column(c).to_pylist() for c in categorical], train)
    num = encode_numeric(
        [np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in numeric], train
    )
    arrays = {
        "categorical": codes,
        "numeric": num,
        "content": content,
        "has_content": has_content.astype(np.float32),
        "label": labels.astype(np.float32),
    }
    splits = {name: {k: v[part == p] for k, v in arrays.items()} for p, name in enumerate(("train", "val", "test"))}

    start_ray(args.address)
    import ray

    model_spec = {
        "cardinalities": sizes,
        "numeric": num.shape[1],
        "content_dim": vectors.dim,
        "hidden": args.hidden,
        "dropout": args.dropout,
    }
    config = {
        "data": [ray.put({"train": splits["train"], "val": splits["val"]})],
        "model": model_spec,
        "variants": {WITH: True, WITHOUT: False},
        "lr": args.lr,
        "l2": args.l2,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "patience": args.patience,
        "seed": args.seed,
        "max_pos_weight": 20.0,
    }
    _, payload = fit(train_loop, config, TrainSettings.from_args(args), "omniembed-fraud")
    test = splits["test"]
    scores: dict[str, np.ndarray] = {}
    for variant, with_content in config["variants"].items():
        model = build_model(model_spec, with_content)
        model.load_state_dict(payload["states"][variant])
        scores[f"classifier, {variant}"] = predict(model, test, with_content)
    scores[f"isolation forest, {WITH}"] = anomaly_scores(splits["train"], test, True, args.seed)
    scores[f"isolation forest, {WITHOUT}"] = anomaly_scores(splits["train"], test, False, args.seed)
    metrics = score_metrics(test["label"], scores)
    if args.output:
        ids = table.column(args.id_column).to_pylist() if args.id_column in table.column_names else None
        _write_outputs(args.output, ids, part, test, scores, metrics, payload)
    print_table(
        f"jobs.fraud: held-out test, {len(test['label']):,} transactions, "
        f"{int(test['label'].sum()):,} fraud (positive rate {test['label'].mean():.4f})",
        ["method", "ROC-AUC", "PR-AUC"],
        [[m, v["roc_auc"], v["pr_auc"]] for m, v in metrics.items()],
    )
    margin = metrics[f"classifier, {WITH}"]["pr_auc"] - metrics[f"classifier, {WITHOUT}"]["pr_auc"]
    print_facts(
        "summary",
        [
            ("transactions train / val / test", " / ".join(f"{int((part == p).sum()):,}" for p in range(3))),
            ("categorical fields (cardinality)", ", ".join(f"{c} ({s})" for c, s in zip(categorical, sizes)) or "-"),
            ("numeric fields", ", ".join(numeric) or "-"),
            ("content vectors", f"{args.column} ({vectors.dim}-d) by {args.vectors_key}"),
            ("transactions without a vector", int((~has_content).sum())),
            ("PR-AUC gain from content vectors", margin),
            ("output", args.output or "-"),
            ("seconds", f"{time.perf_counter() - started:.1f}"),
        ],
    )
    return EXIT_OK


def anomaly_scores(
    train: dict[str, np.ndarray], test: dict[str, np.ndarray], with_content: bool, seed: int
) -> np.ndarray:
    """Isolation forest fit without labels; a higher score is more anomalous."""
    from sklearn.ensemble import IsolationForest

    def features(split: dict[str, np.ndarray]) -> np.ndarray:
        parts = [split["numeric"]] + ([split["content"]] if with_content else [])
        return np.concatenate(parts, axis=1)

    forest = IsolationForest(n_estimators=200, random_state=seed).fit(features(train))
    return -forest.score_samples(features(test))


def score_metrics(labels: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        name: {"roc_auc": float(roc_auc_score(labels, s)), "pr_auc": float(average_precision_score(labels, s))}
        for name, s in scores.items()
    }


def _write_outputs(
    output: str,
    ids: list[Any] | None,
    part: np.ndarray,
    test: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    metrics: dict[str, Any],
    payload: dict[str, Any],
) -> None:
    import pyarrow.parquet as pq

    from pipeline.filesystems import join, open_filesystem

    fs, root = open_filesystem(output)
    fs.create_dir(root, recursive=True)
    columns: dict[str, Any] = {}
    if ids is not None:
        columns["id"] = pa.array([str(i) for i, p in zip(ids, part) if p == 2], pa.string())
    columns["label"] = pa.array(test["label"].astype(np.int8))
    for name, values in scores.items():
        columns["score: " + name] = pa.array(values.astype(np.float32))
    with fs.open_output_stream(join(root, "test_scores.parquet")) as stream:
        pq.write_table(pa.table(columns), stream)
    with fs.open_output_stream(join(root, "metrics.json")) as stream:
        stream.write(json.dumps({"metrics": metrics, "history": payload["history"]}, indent=2).encode())


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("jobs.fraud", __doc__)
    parser.add_argument("--transactions", required=True, help="Parquet/JSONL/CSV file or folder of transactions")
    parser.add_argument("--label", default="label", help="label column, 1 = fraud (default label)")
    parser.add_argument(
        "--categorical", default="", help="comma-separated categorical fields (merchant, device, country, ...)"
    )
    parser.add_argument("--numeric", default="", help="comma-separated numeric fields (amount, hour, ...)")
    parser.add_argument("--vectors", required=True, help="omniembed output folder with the content vectors")
    parser.add_argument("--column", required=True, help="vector column, e.g. text_embedding")
    parser.add_argument(
        "--vectors-key", required=True, help="transaction column that holds the vectors' id (e.g. merchant_id)"
    )
    parser.add_argument("--id-column", default="tx_id", help="transaction id, for the test scores (default tx_id)")
    parser.add_argument("--time-column", help="hold out the latest transactions (default: a stratified random split)")
    parser.add_argument("--val-share", type=float, default=0.15, help="(default 0.15)")
    parser.add_argument("--test-share", type=float, default=0.15, help="(default 0.15)")
    parser.add_argument("--output", help="folder for test_scores.parquet and metrics.json")
    model = parser.add_argument_group("model")
    model.add_argument("--hidden", type=int, default=64, help="MLP width (default 64)")
    model.add_argument("--dropout", type=float, default=0.2, help="(default 0.2)")
    model.add_argument(
        "--l2", type=float, default=1e-4, help="L2 penalty, as the optimizer's weight decay (default 1e-4)"
    )
    return add_fit_flags(parser, model, lr="3e-3", epochs=30, metric="PR-AUC")


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("jobs.fraud", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
