"""jobs.recommend end to end on planted data (users prefer topics; the text says the topic):
the two-tower model beats popularity on recall@10, and its outputs are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jobs.recommend import main
from tests.conftest import own_stderr


def test_two_tower_beats_popularity(job_data, tmp_path, capsys):
    out = tmp_path / "recommend"
    argv = ["--interactions", job_data["interactions"], "--items", job_data["dataset"]]
    argv += ["--column", "text_embedding", "--time-column", "time", "--output", str(out)]
    argv += ["--storage-path", str(tmp_path / "ray"), "--epochs", "25"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recall@10" in printed and "popularity" in printed and "content only" in printed
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    model, popularity = metrics["two-tower (concat)"]["recall@10"], metrics["popularity"]["recall@10"]
    print(
        f"recall@10: two-tower {model:.4f}, popularity {popularity:.4f}, content only "
        f"{metrics['content only']['recall@10']:.4f} (margin {model - popularity:+.4f})"
    )
    assert model > popularity + 0.05
    assert metrics["two-tower (concat)"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]

    recs = pq.read_table(out / "recommendations.parquet").to_pylist()
    interactions = pq.read_table(job_data["interactions"]).to_pylist()
    seen: dict[str, set[str]] = {}
    for row in interactions:
        seen.setdefault(row["user_id"], set()).add(row["item_id"])
    assert len(recs) == len(seen)
    for rec in recs:
        assert len(rec["item_ids"]) == 10 and not set(rec["item_ids"]) & seen[rec["user_id"]]
        assert rec["scores"] == sorted(rec["scores"], reverse=True)
    items = pq.read_table(out / "item_embeddings.parquet")
    vectors = np.array(items.column("embedding").to_pylist(), np.float32)
    assert vectors.shape == (360, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_missing_column_is_one_line(job_data, tmp_path, capsys):
    argv = ["--interactions", job_data["interactions"], "--items", job_data["dataset"]]
    argv += ["--column", "text_embedding", "--user-column", "customer", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = own_stderr(capsys.readouterr().err)
    assert len(err) == 1 and "column 'customer' is not in" in err[0]
    assert main(argv[:4] + ["--items", str(Path(tmp_path) / "missing"), "--column", "x", "--output", "o"]) == 2
