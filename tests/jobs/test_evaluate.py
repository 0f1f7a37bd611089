"""jobs.evaluate: a readable t-SNE PNG (title, axes, legend) and recall@k by label checked
against a brute-force count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jobs.evaluate import evaluate, main
from jobs.vectors import read_vectors


def test_plot_and_report(job_data, tmp_path):
    report = evaluate(job_data["dataset"], "text_embedding", "topic", str(tmp_path / "report"), k=5, show="text")
    figure = report["figure"]
    axes = figure.axes[0]
    assert "t-SNE" in axes.get_title() and axes.get_xlabel() == "t-SNE 1" and axes.get_ylabel() == "t-SNE 2"
    legend = axes.get_legend()
    assert legend is not None and legend.get_title().get_text() == "topic"
    assert len(legend.get_texts()) == 12 and all("(30)" in t.get_text() for t in legend.get_texts())
    png = Path(tmp_path / "report" / "tsne.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    from PIL import Image

    with Image.open(tmp_path / "report" / "tsne.png") as image:
        assert image.width >= 600 and image.height >= 500

    # recall@5 by label against a brute-force count over the same vectors.
    vectors = read_vectors(job_data["dataset"], "text_embedding", ["topic"])
    labels = np.array(vectors.extra["topic"])
    scores = vectors.vectors @ vectors.vectors.T
    np.fill_diagonal(scores, -np.inf)
    top = np.argsort(-scores, axis=1)[:, :5]
    hit = (labels[top] == labels[:, None]).any(1)
    assert abs(report["per_label"]["(all)"]["recall@5"] - hit.mean()) < 1e-9
    assert abs(report["per_label"]["email"]["recall@5"] - hit[labels == "email"].mean()) < 1e-9
    assert report["per_label"]["(all)"]["recall@5"] > 0.8  # topics are recoverable from the text
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(saved["examples"]) == 5 and "## Recall@5 by topic" in (tmp_path / "report" / "report.md").read_text()


def test_cli(job_data, tmp_path, capsys):
    out = tmp_path / "cli-report"
    argv = [job_data["dataset"], "--column", "text_embedding", "--label", "topic", "--output", str(out)]
    argv += ["--sample", "120"]
    assert main(argv) == 0
    assert "recall@10" in capsys.readouterr().out and (out / "tsne.png").is_file()
    assert main([job_data["dataset"], "--column", "text_embedding", "--label", "colour"]) == 2
    assert "column 'colour' is not in dataset" in capsys.readouterr().err
