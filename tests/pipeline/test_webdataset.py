"""WebDataset shards built here from real photos and captions (Python's own docstrings), in the
layout img2dataset writes: ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` per sample. Planning and
reading without Ray, then one run on the session's Ray against the same photos from a folder."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from encoders.core.errors import error_code
from pipeline import webdataset
from pipeline.chunks import plan_sources
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, SourceConfig
from pipeline.tasks import LocalTasks
from pipeline.webdataset import READ_ERRORS, split_name
from tests.image_data import encode, real_photos
from tests.pipeline.test_sources import read_all

CAPTIONS = [
    (len.__doc__ or "").splitlines()[0],
    (sorted.__doc__ or "").splitlines()[0],
    (zip.__doc__ or "").splitlines()[0],
    (print.__doc__ or "").splitlines()[0],
    (range.__doc__ or "").splitlines()[0],
    (map.__doc__ or "").splitlines()[0],
]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder):
    """shard-0: samples 000000-000003; 000001 has no txt, 000002 a corrupt jpg, 000003 a txt
    that is not UTF-8. shard-1: 000004-000005 under a sub-folder key."""
    photos = list(real_photos().values())
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = {}
    with tarfile.open(folder / "shard-0.tar", "w") as tar:
        for i in range(4):
            key = f"{i:06d}"
            jpegs[key] = encode(photos[i]) if i != 2 else b"\xff\xd8\xff\xe0 not a jpeg"
            add(tar, f"{key}.jpg", jpegs[key])
            if i == 3:
                add(tar, f"{key}.txt", b"caf\xe9")  # Latin-1, not UTF-8
            elif i != 1:
                add(tar, f"{key}.txt", CAPTIONS[i].encode())
            add(tar, f"{key}.json", json.dumps({"key": key, "width": photos[i].shape[1]}).encode())
    with tarfile.open(folder / "shard-1.tar", "w") as tar:
        for i in (4, 5):
            key = f"part/{i:06d}"
            jpegs[key] = encode(photos[i])
            add(tar, f"{key}.jpg", jpegs[key])
            add(tar, f"{key}.txt", CAPTIONS[i].encode())
    return jpegs


def test_member_names_split_into_key_and_column():
    assert split_name("a/b/000123.seg.png") == ("a/b/000123", "seg.png")
    assert split_name("000123.jpg") == ("000123", "jpg")
    assert split_name("a.b/c.txt") == ("a.b/c", "txt")  # a dot in a folder is part of the key


def test_samples_become_rows_absent_and_bad_members_told_apart(tmp_path):
    jpegs = write_shards(tmp_path / "shards")
    table, plan = read_all([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")])
    rows = {r["id"]: r for r in table.to_pylist()}
    assert list(rows) == ["000000", "000001", "000002", "000003", "part/000004", "part/000005"]
    assert plan.rows == 6 and plan.chunks.num_rows == 2
    assert {k: rows[k]["jpg"] for k in rows} == jpegs  # media members stay bytes
    assert rows["000000"]["txt"] == CAPTIONS[0] and json.loads(rows["000002"]["json"])["key"] == "000002"
    assert rows["000001"]["txt"] is None and rows["000001"][READ_ERRORS] is None  # absent, not an error
    assert rows["000003"]["txt"] is None
    assert error_code(json.loads(rows["000003"][READ_ERRORS])["txt"]) == "decode_failed"
    assert rows["part/000005"]["json"] is None  # that shard has no json members


def test_a_shard_is_cut_into_ranges_that_read_the_same_rows(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards")
    whole, _ = read_all([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")])
    monkeypatch.setattr(webdataset, "SAMPLES_PER_CHUNK", 1)
    cut, plan = read_all([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")])
    assert plan.chunks.num_rows == 6 and plan.chunks.column("rows").to_pylist() == [1] * 6
    assert cut.equals(whole)


def test_a_truncated_shard_keeps_the_samples_before_the_break(tmp_path):
    write_shards(tmp_path / "shards")
    data = (tmp_path / "shards" / "shard-0.tar").read_bytes()
    with tarfile.open(tmp_path / "shards" / "shard-0.tar") as tar:
        third_jpg = next(m for m in tar.getmembers() if m.name == "000002.jpg")
    cut_at = third_jpg.offset_data + 5  # inside sample 000002's first member
    (tmp_path / "shards" / "shard-0.tar").write_bytes(data[:cut_at])
    chunk_plan = plan_sources([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")], LocalTasks())
    assert len(chunk_plan.warnings) == 1
    warning = chunk_plan.warnings[0]
    assert "\n" not in warning and warning.startswith("shard-0.tar: the shard breaks after 2 complete samples")
    table, plan = read_all([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")])
    assert table.column("id").to_pylist() == ["000000", "000001", "part/000004", "part/000005"]


def test_a_key_in_two_shards_is_a_duplicate_id(tmp_path):
    write_shards(tmp_path / "shards")
    with tarfile.open(tmp_path / "shards" / "shard-2.tar", "w") as tar:
        add(tar, "000000.txt", b"again")
    with pytest.raises(
        ConfigError,
        match="1 ids occur more than once .e.g. '000000'.; fix the input or set output.on_duplicate_id: keep-first",
    ):
        read_all([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")])
    table, plan = read_all(
        [SourceConfig(path=str(tmp_path / "shards"), format="webdataset")], on_duplicate_id="keep-first"
    )
    assert plan.duplicates == 1 and table.column("id").to_pylist().count("000000") == 1


def test_shards_embedded_equal_the_same_photos_from_a_folder(ray_session, tiny_bert, tmp_path):
    """Image vectors from the shards' jpg members equal those of the same files in a folder; the
    corrupt member and the bad caption are error values, the missing caption is absent, and the
    media members stay out of the output while the text members pass through."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="extra 'weights' not installed")
    jpegs = write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    flags = ["--format", "webdataset", "--image-column", "jpg", "--image-model", "efficientnet-lite0"]
    flags += ["--text-column", "txt", "--text-model", tiny_bert, "--max-error-rate", "0.9"]
    assert cli_main(["embed", str(tmp_path / "shards"), "--output", str(out), *flags]) == 0
    table = pq.read_table(out).sort_by("id")
    assert "jpg" not in table.column_names and {"txt", "json"} <= set(table.column_names)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert error_code(rows["000002"]["jpg_error"]) == "decode_failed"
    assert error_code(rows["000003"]["txt_error"]) == "decode_failed" and rows["000003"]["txt_embedding"] is None
    assert rows["000001"]["txt_error"] is None and rows["000001"]["txt_embedding"] is None  # absent
    assert rows["000000"]["txt_embedding"] is not None and rows["part/000005"]["jpg_error"] is None

    folder = tmp_path / "photos"
    for key, data in jpegs.items():
        if key != "000002":
            (folder / f"{key}.jpg").parent.mkdir(parents=True, exist_ok=True)
            (folder / f"{key}.jpg").write_bytes(data)
    reference = tmp_path / "reference"
    flags = ["--kind", "image", "--image-model", "efficientnet-lite0"]
    assert cli_main(["embed", str(folder), "--output", str(reference), *flags]) == 0
    expected = {r["id"][: -len(".jpg")]: r["image_embedding"] for r in pq.read_table(reference).to_pylist()}
    assert sorted(expected) == sorted(k for k in jpegs if k != "000002")
    for key, vector in expected.items():
        np.testing.assert_allclose(rows[key]["jpg_embedding"], vector, atol=1e-6)


def test_shards_named_by_a_glob(tmp_path):
    write_shards(tmp_path / "shards")
    with tarfile.open(tmp_path / "shards" / "other.tar", "w") as tar:
        add(tar, "zzz.txt", b"not matched")
    nested = tmp_path / "shards" / "more"
    nested.mkdir()
    with tarfile.open(nested / "shard-9.tar", "w") as tar:
        add(tar, "more/000009.txt", b"nested")
    ids = lambda path: read_all([SourceConfig(path=path, format="webdataset")])[0].column("id").to_pylist()  # noqa: E731
    assert ids(str(tmp_path / "shards" / "shard-*.tar")) == [
        "000000",
        "000001",
        "000002",
        "000003",
        "part/000004",
        "part/000005",
    ]
    assert ids(str(tmp_path / "shards" / "shard-[1].tar")) == ["part/000004", "part/000005"]
    assert ids(str(tmp_path / "shards" / "**" / "shard-9.tar")) == ["more/000009"]
    with pytest.raises(ConfigError, match="no webdataset files"):
        ids(str(tmp_path / "shards" / "nothing-*.tar"))
