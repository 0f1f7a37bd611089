"""jobs.fraud end to end on planted data (fraud odds depend on the bought item's text and on
categorical fields): the classifier with content vectors beats the one without on PR-AUC."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from jobs.fraud import WITH, WITHOUT, main
from tests.conftest import own_stderr


def test_content_vectors_add_pr_auc(job_data, tmp_path, capsys):
    out = tmp_path / "fraud"
    argv = ["--transactions", job_data["transactions"], "--categorical", "merchant_id,device,country,channel"]
    argv += ["--numeric", "amount,hour", "--vectors", job_data["dataset"], "--column", "text_embedding"]
    argv += ["--vectors-key", "item_id", "--output", str(out), "--storage-path", str(tmp_path / "ray")]
    argv += ["--epochs", "20"]
    assert main(argv) == 0
    assert "PR-AUC" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    with_, without = metrics[f"classifier, {WITH}"], metrics[f"classifier, {WITHOUT}"]
    print(
        f"PR-AUC with vectors {with_['pr_auc']:.4f}, without {without['pr_auc']:.4f} "
        f"(margin {with_['pr_auc'] - without['pr_auc']:+.4f}); ROC-AUC {with_['roc_auc']:.4f} vs "
        f"{without['roc_auc']:.4f}"
    )
    assert with_["pr_auc"] > without["pr_auc"] + 0.05
    assert with_["roc_auc"] > without["roc_auc"]
    assert {f"isolation forest, {WITH}", f"isolation forest, {WITHOUT}"} <= set(metrics)
    scores = pq.read_table(out / "test_scores.parquet")
    assert scores.num_rows == 900 and scores.column("id").null_count == 0


def test_missing_file_is_one_line(job_data, tmp_path, capsys):
    argv = ["--transactions", str(tmp_path / "none.parquet"), "--numeric", "amount"]
    argv += ["--vectors", job_data["dataset"], "--column", "text_embedding", "--vectors-key", "item_id"]
    assert main(argv) == 2
    err = own_stderr(capsys.readouterr().err)
    assert len(err) == 1 and "--transactions" in err[0] and "does not exist" in err[0]
