"""``python -m jobs.evaluate``: how good is a vector column? A t-SNE plot coloured by a label,
nearest-neighbour examples and recall@k by label.

    python -m jobs.evaluate examples/out/items --column text_embedding --label topic --show text

Written to ``--output`` (default ``<dataset>.report/``, beside the dataset):
- ``tsne.png``: t-SNE (scikit-learn) of up to ``--sample`` vectors, one colour per label;
- ``report.md`` and ``report.json``: per label, recall@k (the share of rows with at least one
  same-label row among their k nearest neighbours, as in metric-learning papers) and
  precision@k (the mean share of same-label rows among them), over all vectors; and a few rows
  with their nearest neighbours.
Neighbours are exact (cosine, or inner product for normalized vectors), the row itself left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from typing import Any, Sequence

import numpy as np

from jobs.ann import ExactIndex, neighbours_without_self, resolve_metric, search_space
from jobs.entrypoint import EXIT_OK, JobError, add_common_flags, job_parser, run_job
from jobs.summary import print_facts, print_table
from jobs.vectors import read_vectors
from pipeline.filesystems import join, open_filesystem

MAX_COLOURS = 20  # past that, the rarest labels share one "other" colour
log = logging.getLogger(__name__)


def tsne_points(vectors: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """(n, D) -> (n, 2)."""
    from sklearn.manifold import TSNE

    if len(vectors) < 5:
        raise JobError(f"t-SNE needs at least 5 vectors, got {len(vectors)}")
    perplexity = min(perplexity, (len(vectors) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(
        vectors
    )


def plot_tsne(points: np.ndarray, labels: Sequence[str], title: str, label_name: str) -> Any:
    """A matplotlib Figure: one scatter per label (legend), axes named, titled."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed on a cluster node
    import matplotlib.pyplot as plt

    counts = Counter(labels)
    shown = [label for label, _ in counts.most_common(MAX_COLOURS - 1 if len(counts) > MAX_COLOURS else MAX_COLOURS)]
    names = np.array([label if label in shown else "other" for label in labels], dtype=object)
    figure, axes = plt.subplots(figsize=(9, 7), dpi=110)
    colours = plt.get_cmap("tab20")
    for i, label in enumerate(sorted(set(names.tolist()), key=lambda x: (x == "other", x))):
        rows = names == label
        axes.scatter(
            points[rows, 0], points[rows, 1], s=10, alpha=0.8, color=colours(i % 20), label=f"{label} ({rows.sum()})"
        )
    axes.set_title(title)
    axes.set_xlabel("t-SNE 1")
    axes.set_ylabel("t-SNE 2")
    axes.legend(
        title=label_name, fontsize=8, title_fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False
    )
    figure.tight_layout()
    return figure


def label_metrics(neighbours: np.ndarray, labels: np.ndarray, k: int) -> dict[str, dict[str, float]]:
    """Per label and overall: recall@k (>= 1 same-label neighbour) and precision@k."""
    same = labels[neighbours] == labels[:, None]  # (n, k)
    same &= neighbours >= 0
    out = {}
    for label in sorted(set(labels.tolist())):
        rows = labels == label
        out[str(label)] = {
            "rows": int(rows.sum()),
            f"recall@{k}": float(same[rows].any(1).mean()),
            f"precision@{k}": float(same[rows].mean()),
        }
    out["(all)"] = {"rows": len(labels), f"recall@{k}": float(same.any(1).mean()), f"precision@{k}": float(same.mean())}
    return out


def evaluate(
    dataset: str,
    column: str,
    label: str,
    output: str | None = None,
    k: int = 10,
    sample: int = 2000,
    show: str | None = None,
    examples: int = 5,
    perplexity: float = 30.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Writes tsne.png, report.md and report.json; returns the report (and the figure under "figure")."""
    output = output or dataset.rstrip("/") + ".report"
    _, out_root = open_filesystem(output)
    _, data_root = open_filesystem(dataset)
    if (out_root.rstrip("/") + "/").startswith(data_root.rstrip("/") + "/"):
        raise JobError(f"--output {output!r} is inside the dataset folder; Parquet readers would trip over it")
    extra = [label] + ([show] if show and show != label else [])
    vectors = read_vectors(dataset, column, extra)
    if len(vectors.ids) < 2:
        raise JobError(f"column {column!r} has {len(vectors.ids)} vectors; need at least 2")
    labels = np.array(["(null)" if v is None else str(v) for v in vectors.extra[label]], dtype=object)
    metric = resolve_metric("auto", vectors.encoder.normalized)
    space = search_space(vectors.vectors, metric)
    k = min(k, len(space) - 1)
    started = time.perf_counter()
    _, rows = ExactIndex(space).search(space, k + 1)
    neighbours = neighbours_without_self(rows, np.arange(len(space)), k)
    per_label = label_metrics(neighbours, labels, k)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(space), size=min(sample, len(space)), replace=False))
    log.info("t-SNE of %d vectors", len(picked))
    points = tsne_points(space[picked], perplexity, seed)
    title = f"{column} of {dataset.rstrip('/').rpartition('/')[2]}: t-SNE of {len(picked):,} vectors by {label}"
    figure = plot_tsne(points, labels[picked].tolist(), title, label)
    texts = vectors.extra.get(show) if show else None
    example_rows = [
        _example(int(q), neighbours[q][:5], space, vectors.ids, labels, texts)
        for q in rng.choice(len(space), size=min(examples, len(space)), replace=False)
    ]
    report = {
        "dataset": dataset,
        "column": column,
        "label": label,
        "k": k,
        "metric": metric,
        "vectors": len(vectors.ids),
        "null_rows_skipped": vectors.nulls,
        "tsne_points": len(picked),
        "per_label": per_label,
        "examples": example_rows,
        "seconds": time.perf_counter() - started,
    }
    _write(output, figure, report)
    report["output"] = output
    report["figure"] = figure
    return report


def _example(
    row: int, neighbours: np.ndarray, space: np.ndarray, ids: np.ndarray, labels: np.ndarray, texts: list[Any] | None
) -> dict[str, Any]:
    def entry(r: int) -> dict[str, Any]:
        item = {"id": str(ids[r]), "label": str(labels[r])}
        if texts is not None:
            item["text"] = _short(texts[r])
        return item

    return {
        "query": entry(row),
        "neighbours": [{**entry(int(n)), "score": float(space[row] @ space[n])} for n in neighbours if n >= 0],
    }


def _short(value: Any, width: int = 100) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _write(output: str, figure: Any, report: dict[str, Any]) -> None:
    import io

    fs, root = open_filesystem(output)
    fs.create_dir(root, recursive=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    with fs.open_output_stream(join(root, "tsne.png")) as stream:
        stream.write(buffer.getvalue())
    with fs.open_output_stream(join(root, "report.json")) as stream:
        stream.write(json.dumps(report, indent=2, default=str).encode())
    with fs.open_output_stream(join(root, "report.md")) as stream:
        stream.write(_markdown(report).encode())


def _markdown(report: dict[str, Any]) -> str:
    k = report["k"]
    lines = [
        f"# {report['column']} of {report['dataset']}",
        "",
        f"{report['vectors']:,} vectors ({report['null_rows_skipped']:,} null rows skipped), {report['metric']} "
        f"neighbours, labels from `{report['label']}`.",
        "",
        "![t-SNE](tsne.png)",
        "",
        f"## Recall@{k} by {report['label']}",
        "",
        f"| {report['label']} | rows | recall@{k} | precision@{k} |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {m['rows']} | {m[f'recall@{k}']:.3f} | {m[f'precision@{k}']:.3f} |"
        for name, m in report["per_label"].items()
    ]
    lines += ["", "## Nearest neighbours", ""]
    for example in report["examples"]:
        q = example["query"]
        lines.append(f"- **{q['id']}** ({q['label']}) {q.get('text', '')}")
        lines += [f"  - {n['score']:.3f} {n['id']} ({n['label']}) {n.get('text', '')}" for n in example["neighbours"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("jobs.evaluate", __doc__)
    parser.add_argument("dataset", help="omniembed output folder (or URI)")
    parser.add_argument("--column", required=True, help="vector column, e.g. text_embedding")
    parser.add_argument(
        "--label", required=True, help="a passthrough column to colour by and score against (e.g. topic)"
    )
    parser.add_argument("--output", help="report folder (default: <dataset>.report, beside the dataset)")
    parser.add_argument("--show", help="a text column to print in the neighbour examples")
    parser.add_argument("-k", type=int, default=10, help="k of recall@k (default 10)")
    parser.add_argument("--sample", type=int, default=2000, help="vectors in the t-SNE plot (default 2000)")
    parser.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default 30)")
    parser.add_argument("--examples", type=int, default=5, help="rows shown with their neighbours (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    add_common_flags(parser)
    return parser


def _body(args: argparse.Namespace) -> int:
    if args.k < 1 or args.sample < 5:
        raise JobError("-k must be >= 1 and --sample >= 5")
    report = evaluate(
        args.dataset,
        args.column,
        args.label,
        args.output,
        args.k,
        args.sample,
        args.show,
        args.examples,
        args.perplexity,
        args.seed,
    )
    k = report["k"]
    print_table(
        f"jobs.evaluate: {report['column']} by {report['label']} ({report['vectors']:,} vectors, k={k})",
        [report["label"], "rows", f"recall@{k}", f"precision@{k}"],
        [[name, m["rows"], m[f"recall@{k}"], m[f"precision@{k}"]] for name, m in report["per_label"].items()],
    )
    print_facts(
        "summary",
        [
            ("null rows skipped", report["null_rows_skipped"]),
            ("t-SNE points", report["tsne_points"]),
            ("plot", join(report["output"], "tsne.png")),
            ("report", join(report["output"], "report.md")),
            ("seconds", f"{report['seconds']:.1f}"),
        ],
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("jobs.evaluate", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
