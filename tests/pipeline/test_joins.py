"""Sources joined by id: a photo folder and a captions file, three ways. Without Ray: the
planning, the id pass and the read run their tasks in a loop, as a run does on Ray; then one
run on the session's Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.chunks import plan_sources
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, SourceConfig, config_from_dict
from pipeline.joins import id_pass
from pipeline.progress import account
from pipeline.sources import CHUNK_COLUMN, read_chunk_rows
from pipeline.tasks import LocalTasks
from tests.image_data import encode, real_photos

CAPTIONS = {
    "cat.jpg": (str.upper.__doc__ or "").splitlines()[0],
    "coffee.jpg": (str.lower.__doc__ or "").splitlines()[0],
    "rocket.jpg": (str.title.__doc__ or "").splitlines()[0],
    "orphan.jpg": (str.strip.__doc__ or "").splitlines()[0],  # a caption without a photo
}


def read_joined(sources, on_duplicate_id="error", ids_per_task=2):
    tasks = LocalTasks()
    chunks = plan_sources(sources, tasks)
    duplicates = id_pass(chunks.chunks, sources, on_duplicate_id, tasks)
    plan = account(chunks, duplicates, None, "/nonexistent", tasks)
    batch = pa.table({"id": list(range(plan.chunks.num_rows))})
    table = read_chunk_rows(batch, plan.chunks, plan.schema, "/nonexistent", partners=plan.partners)
    return table.drop_columns([CHUNK_COLUMN]).sort_by("id"), plan


@pytest.fixture
def photos_and_captions(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    images = real_photos()
    for name, photo in (
        ("cat.jpg", "chelsea"),
        ("coffee.jpg", "coffee"),
        ("rocket.jpg", "rocket"),
        ("moon.jpg", "moon"),
    ):
        (photos / name).write_bytes(encode(images[photo]))
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file": k, "caption": v}) + "\n" for k, v in CAPTIONS.items()))
    return photos, captions


def sources(photos, captions, join):
    return [SourceConfig(path=str(photos), kind="image"), SourceConfig(path=str(captions), id_column="file", join=join)]


@pytest.mark.parametrize(
    "join, ids",
    [
        ("left", ["cat.jpg", "coffee.jpg", "moon.jpg", "rocket.jpg"]),
        ("inner", ["cat.jpg", "coffee.jpg", "rocket.jpg"]),
        ("outer", ["cat.jpg", "coffee.jpg", "moon.jpg", "orphan.jpg", "rocket.jpg"]),
    ],
)
def test_a_folder_and_its_captions_joined_three_ways(photos_and_captions, join, ids):
    photos, captions = photos_and_captions
    table, plan = read_joined(sources(photos, captions, join))
    assert table.column("id").to_pylist() == ids
    assert plan.to_embed == len(ids) and plan.rows == 8  # 4 photos + 4 captions read, one row per id
    rows = {r["id"]: r for r in table.to_pylist()}
    for key, row in rows.items():
        assert row["caption"] == CAPTIONS.get(key)  # null where the id has no caption
        assert (row["image"] is None) == (key == "orphan.jpg")  # a caption-only row has no photo
        if row["image"] is not None:
            assert row["image"].endswith(key)


def test_a_column_on_both_sides_is_a_one_line_error(photos_and_captions, tmp_path):
    photos, _ = photos_and_captions
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"file": "cat.jpg", "image": "x"}) + "\n")
    with pytest.raises(ConfigError) as info:
        read_joined(sources(photos, clash, "left"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("sources[1]: column 'image' is also a column of a source above")


def test_duplicates_within_a_joined_source_follow_on_duplicate_id(photos_and_captions, tmp_path):
    photos, _ = photos_and_captions
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps({"file": "cat.jpg", "caption": c}) + "\n" for c in ("first", "second")))
    with pytest.raises(ConfigError, match="1 ids occur more than once within a source .e.g. 'cat.jpg'."):
        read_joined(sources(photos, twice, "left"))
    table, _ = read_joined(sources(photos, twice, "left"), on_duplicate_id="keep-first")
    assert dict(zip(table.column("id").to_pylist(), table.column("caption").to_pylist()))["cat.jpg"] == "first"


def test_the_first_source_cannot_join():
    with pytest.raises(ConfigError, match=r"sources\[0\]\.join: the first source has no source above it"):
        config_from_dict({"sources": [{"path": "x", "join": "left"}], "encoders": [], "output": {"path": "o"}})


def test_photos_and_captions_embedded_side_by_side(ray_session, photos_and_captions, tiny_bert, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="extra 'weights' not installed")
    photos, captions = photos_and_captions
    out = tmp_path / "out"
    config = tmp_path / "join.yaml"
    config.write_text(
        json.dumps(
            {
                "sources": [
                    {"path": str(photos), "kind": "image"},
                    {"path": str(captions), "id_column": "file", "join": "left"},
                ],
                "encoders": [
                    {"output": "photo", "column": "image", "model": "efficientnet-lite0"},
                    {"output": "caption", "column": "caption", "model": tiny_bert},
                ],
                "output": {"path": str(out), "max_error_rate": 0.0},
            }
        )
    )
    assert cli_main(["run", str(config)]) == 0
    table = pq.read_table(out).sort_by("id")
    assert table.column("id").to_pylist() == ["cat.jpg", "coffee.jpg", "moon.jpg", "rocket.jpg"]
    assert table.column("photo_embedding").null_count == 0
    captions_by_id = dict(zip(table.column("id").to_pylist(), table.column("caption_embedding").to_pylist()))
    assert captions_by_id["moon.jpg"] is None and all(captions_by_id[k] for k in ("cat.jpg", "coffee.jpg"))
    assert table.column("caption_error").null_count == 4  # an absent caption is not an error
