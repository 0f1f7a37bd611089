"""``python -m jobs.finetune``: fine-tune a text encoder on your own (anchor, positive) pairs with
Ray Train, into a sentence-transformers folder that omniembed embeds with (``model: DIR``).

    python -m jobs.finetune --pairs examples/data/docstring_pairs.jsonl \\
        --model sentence-transformers/all-MiniLM-L6-v2 --output examples/out/minilm-docstrings

- Pairs: any file, folder or URI the pipeline reads (Parquet, JSONL, CSV), with an anchor and
  a positive column (``anchor`` and ``positive`` by default) and optionally a hard negative.
  Rows with an empty anchor, positive or negative are dropped and counted.
- The model: any reference the pipeline accepts (alias, hub id, local folder) of the hf-text
  family, embedded exactly as the pipeline embeds it (prompt, lowercasing, max length,
  pooling, the folder's modules after Pooling, normalization: jobs/text_tower.py).
- Loss: multiple-negatives ranking (in-batch negatives, cosine x 20), computed in cached
  mini-batches (``--mini-batch-size`` texts at a time), so ``--batch-size`` is not capped by
  memory. AdamW with weight decay, warm-up, dropout, mixed precision on a GPU
  (jobs/finetune_loop.py), on Ray Train: ``--workers N --use-gpu yes`` on a cluster.
- Validation: ``--validation PATH``, else a seeded ``--validation-fraction`` of the pairs held
  out. Recall@1, recall@10 and MRR of each anchor against every validation positive, for the
  base model before training and after every epoch; early stopping on MRR keeps the best.
- Written to ``--output``: the sentence-transformers folder (jobs/st_folder.py), checked by
  embedding a few validation texts through the pipeline's own encoder; ``metrics.json`` (every
  epoch, base against tuned, the settings); ``validation_curve.png``.

The pairs are read on the driver and handed to the workers through Ray's object store: fine for
millions of pairs, not for billions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jobs.entrypoint import EXIT_OK, JobError, add_common_flags, add_ray_flags, job_parser, run_job, start_ray
from jobs.summary import print_facts, print_table
from jobs.trainer import TrainSettings, add_train_flags, fit

log = logging.getLogger(__name__)
METRICS = ("recall@1", "recall@10", "mrr")
CHECK_TEXTS = 16  # validation texts embedded again through the pipeline's encoder from the output


def read_pairs(path: str, flag: str, columns: Sequence[str]) -> tuple[dict[str, list[str]], int]:
    """The pairs' text columns, and how many rows were dropped for an empty or non-text cell."""
    from jobs.tables import read_table

    table = read_table(path, flag, columns)
    values = [table.column(c).to_pylist() for c in columns]
    keep = [all(isinstance(v, str) and v.strip() for v in row) for row in zip(*values)]
    pairs = {c: [v for v, k in zip(vals, keep) if k] for c, vals in zip(columns, values)}
    if not pairs[columns[0]]:
        why = "it has no rows" if not table.num_rows else f"all {table.num_rows:,} rows have an empty or non-text cell"
        raise JobError(f"{flag}: no usable pairs in {path!r}: {why}")
    return pairs, table.num_rows - len(pairs[columns[0]])


def split_pairs(
    pairs: dict[str, list[str]], fraction: float, limit: int, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """A seeded share held out for validation (at most ``limit`` pairs); the rest trains."""
    n = len(pairs["anchor"])
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(limit, max(2, int(round(fraction * n))))
    if n - n_val < 2:
        raise JobError(
            f"--pairs: {n} usable pairs are too few to hold out {n_val} for validation and train on the rest"
        )
    take = lambda rows: {c: [v[i] for i in rows] for c, v in pairs.items()}  # noqa: E731
    return take(sorted(order[n_val:])), take(sorted(order[:n_val]))


def resolve_model(args: argparse.Namespace) -> Any:
    from jobs.text_tower import TowerSpec
    from pipeline.config import ConfigError, EncoderConfig
    from pipeline.plan import plan_encoder

    options: dict[str, Any] = {"precision": "fp32"}
    if args.max_length:
        options["max_length"] = args.max_length
    if args.trust_remote_code:
        options["trust_remote_code"] = True
    try:
        spec = plan_encoder(EncoderConfig("finetune", args.model, {"*": "text"}, None, options), "--model")
    except ConfigError as exc:
        raise JobError(str(exc).splitlines()[0].replace("--model.model: ", "--model: ")) from None
    if spec.family != "hf-text":
        raise JobError(
            f"--model: {args.model!r} is a {spec.family} model; jobs.finetune trains text encoders "
            "(sentence-transformers folders and Hugging Face text models, family hf-text)"
        )
    return TowerSpec(spec.weights.path, dict(spec.options), spec.weights_sha256)


def _body(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _check_flags(args)
    columns = [args.anchor_column, args.positive_column] + ([args.negative_column] if args.negative_column else [])
    names = ["anchor", "positive", "negative"][: len(columns)]
    raw, dropped = read_pairs(args.pairs, "--pairs", columns)
    pairs = dict(zip(names, raw.values()))
    if args.validation:
        val_raw, _ = read_pairs(args.validation, "--validation", columns[:2])
        train, val = pairs, dict(zip(names[:2], val_raw.values()))
        val = {c: v[: args.max_validation] for c, v in val.items()}
    else:
        train, val = split_pairs(pairs, args.validation_fraction, args.max_validation, args.seed)
    spec = resolve_model(args)
    start_ray(args.address)
    import ray

    config = {
        "data": [ray.put({"train": train, "val": val})],
        "spec": spec,
        **{k: getattr(args, k) for k in ("lr", "weight_decay", "warmup_ratio", "dropout", "epochs", "patience")},
        **{k: getattr(args, k) for k in ("batch_size", "mini_batch_size", "seed", "precision", "progress_seconds")},
        "cpus_per_worker": args.cpus_per_worker,
    }
    _, payload = fit(
        _loop(), config, TrainSettings.from_args(args), f"omniembed-finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    history = payload["history"]
    best = next(h for h in history if h["epoch"] == payload["best_epoch"])
    check = write_output(args, spec, payload["state"], history, best, val)
    report = {
        "model": args.model,
        "weights_sha256": {"base": spec.weights_sha256, "tuned": check["weights_sha256"]},
        "pairs": {"train": len(train["anchor"]), "validation": len(val["anchor"]), "dropped": dropped},
        "base": {k: history[0][k] for k in METRICS},
        "tuned": {k: best[k] for k in METRICS},
        "best_epoch": payload["best_epoch"],
        "history": history,
        "omniembed_check_min_cosine": check["min_cosine"],
        "settings": {k: v for k, v in vars(args).items() if k not in ("verbose",)},
    }
    output = Path(args.output)
    (output / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curve(history, output / "validation_curve.png", args.model)
    _print_summary(report, len(history) - 1, output, time.perf_counter() - started)
    return EXIT_OK


def _loop() -> Any:
    from jobs.finetune_loop import train_loop

    return train_loop


def _check_flags(args: argparse.Namespace) -> None:
    """Every flag checked before Ray starts: one line naming it."""
    for flag in ("epochs", "batch_size", "mini_batch_size", "max_validation"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise JobError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if args.batch_size < 2:
        raise JobError("--batch-size: must be >= 2 (the other pairs of a batch are the negatives)")
    if not 0 < args.validation_fraction < 1:
        raise JobError(f"--validation-fraction: must be between 0 and 1, got {args.validation_fraction}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise JobError(f"--dropout: must be in [0, 1), got {args.dropout}")
    if not 0 <= args.warmup_ratio < 1:
        raise JobError(f"--warmup-ratio: must be in [0, 1), got {args.warmup_ratio}")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise JobError(f"--output: {args.output!r} exists and is not empty; pass --overwrite or another folder")


def write_output(
    args: argparse.Namespace, spec: Any, state: dict[str, Any], history: list[dict[str, Any]], best: Any, val: Any
) -> dict[str, Any]:
    """The tuned folder, then a check: a few validation texts through omniembed's own encoder
    loaded from it, against the tower that trained (cosine)."""
    import shutil

    import torch
    import torch.nn.functional as F

    from encoders import FAMILIES
    from jobs.query_encoding import QueryEncoder
    from jobs.st_folder import write_folder
    from jobs.text_tower import TextTower, embed_all
    from pipeline.config import EncoderConfig
    from pipeline.plan import plan_encoder

    tower = TextTower(spec)
    tower.load_state_dict(state)
    output = Path(args.output)
    if args.overwrite and output.exists():
        shutil.rmtree(output)
    write_folder(tower, str(output), model_card(args, history, best))
    texts = (val["anchor"][: CHECK_TEXTS // 2] + val["positive"][: CHECK_TEXTS // 2])[:CHECK_TEXTS]
    ours = embed_all(tower, tower.tokenize(texts))
    options = {"precision": "fp32", **({"trust_remote_code": True} if args.trust_remote_code else {})}
    tuned = plan_encoder(EncoderConfig("check", str(output), {"*": "text"}, None, options), "--output")
    encoder = QueryEncoder(tuned, FAMILIES.get("hf-text").load(tuned, torch.device("cpu")))
    cosine = float(F.cosine_similarity(ours, torch.from_numpy(encoder.encode("text", texts))).min())
    if cosine < 0.999:
        raise RuntimeError(f"the written folder embeds differently from the trained model (cosine {cosine:.4f})")
    return {"weights_sha256": tuned.weights_sha256, "min_cosine": cosine}


def model_card(args: argparse.Namespace, history: list[dict[str, Any]], best: dict[str, Any]) -> str:
    rows = "\n".join(f"| {m} | {history[0][m]:.4f} | {best[m]:.4f} |" for m in METRICS)
    return (
        f"# Fine-tuned from {args.model}\n\n"
        f"Trained by `python -m jobs.finetune` on `{args.pairs}` (multiple-negatives ranking loss).\n"
        f"Best epoch: {best['epoch']} (0 is the base model). Validation retrieval:\n\n"
        f"| metric | base | tuned |\n|---|---|---|\n{rows}\n\n"
        "Load it with `SentenceTransformer(DIR)`, `AutoModel.from_pretrained(DIR)`, or omniembed's `model: DIR`.\n"
    )


def plot_curve(history: list[dict[str, Any]], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    for metric in METRICS:
        axes.plot(epochs, [h[metric] for h in history], marker="o", label=f"validation {metric}")
    axes.set_xlabel("epoch (0 = base model)")
    axes.set_ylabel("score")
    axes.set_xticks(epochs)
    axes.set_title(f"jobs.finetune: {model}")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _print_summary(report: dict[str, Any], epochs_run: int, output: Path, seconds: float) -> None:
    print_table(
        f"jobs.finetune: validation retrieval over {report['pairs']['validation']:,} held-out pairs",
        ["metric", "base", "tuned", "change"],
        [[m, report["base"][m], report["tuned"][m], f"{report['tuned'][m] - report['base'][m]:+.4f}"] for m in METRICS],
    )
    best = report["best_epoch"]
    print_facts(
        "summary",
        [
            ("pairs train / validation", f"{report['pairs']['train']:,} / {report['pairs']['validation']:,}"),
            ("dropped: empty or non-text cell", report["pairs"]["dropped"]),
            ("epochs run (best)", f"{epochs_run} ({best}{': no epoch beat the base model' if best == 0 else ''})"),
            ("omniembed check (min cosine)", report["omniembed_check_min_cosine"]),
            ("output", str(output)),
            ("seconds", f"{seconds:.1f}"),
        ],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("jobs.finetune", __doc__)
    parser.add_argument("--pairs", required=True, help="Parquet/JSONL/CSV file, folder or URI of text pairs")
    parser.add_argument("--model", required=True, help="alias, hub id or local folder of a text encoder")
    parser.add_argument("--output", required=True, help="folder for the tuned model, metrics.json and the plot")
    for role in ("anchor", "positive"):
        parser.add_argument(f"--{role}-column", default=role, help=f"(default {role})")
    parser.add_argument("--negative-column", help="a hard negative per pair (optional)")
    parser.add_argument("--validation", help="held-out pairs (same columns); default: a share of --pairs")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="held-out share (default 0.1)")
    parser.add_argument("--max-validation", type=int, default=10_000, help="held-out pairs at most (default 10000)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--progress-seconds", type=float, default=30, help="a progress line this often (default 30)")
    model = parser.add_argument_group("training")
    model.add_argument("--epochs", type=int, default=4, help="at most (default 4)")
    model.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    model.add_argument("--batch-size", type=int, default=64, help="pairs per step: in-batch negatives (default 64)")
    model.add_argument(
        "--mini-batch-size",
        type=int,
        help="texts per forward pass, the memory bound (default 16 on a CPU, where short padding wins; 128 on a GPU)",
    )
    model.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    model.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps warming up (default 0.1)")
    model.add_argument("--dropout", type=float, help="dropout of the transformer (default: the model's own)")
    model.add_argument(
        "--patience", type=int, default=2, help="epochs without a better MRR before stopping (default 2)"
    )
    model.add_argument("--max-length", type=int, help="tokens per text (default: the model folder's)")
    model.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="of the training steps; auto: bf16 where the GPU or CPU computes it natively, fp16 on older GPUs, "
        "else fp32 (validation is always fp32)",
    )
    model.add_argument("--trust-remote-code", action="store_true", help="allow the folder's own code")
    model.add_argument("--seed", type=int, default=0)
    add_train_flags(parser)
    add_ray_flags(parser)
    add_common_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("jobs.finetune", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
