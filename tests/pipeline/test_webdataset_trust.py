"""``on_duplicate_id: trust`` with WebDataset: planning reads only the head of each shard, and the
read counts the rest. Counts, breaks, resume and the exactly-once check still hold."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import webdataset
from pipeline.chunks import plan_sources
from pipeline.cli import main as cli_main
from pipeline.config import SourceConfig
from pipeline.dedupe import find_duplicates
from pipeline.progress import account
from pipeline.sources import CHUNK_COLUMN, parse_tags, read_chunk_rows
from pipeline.tasks import LocalTasks
from tests.pipeline.test_sources import read_all
from tests.pipeline.test_webdataset import add, write_shards
from tests.text_data import docstring_lines


def read_counted_on_read(sources, records=None, output="/nonexistent"):
    """Plan with counting on read (no id pass), then read as a run does: rows and their tags."""
    tasks = LocalTasks()
    chunks = plan_sources(sources, tasks, count_on_read=True)
    plan = account(chunks, find_duplicates(chunks.chunks, "trust", tasks), records, output, tasks)
    batch = pa.table({"id": list(range(plan.chunks.num_rows))})
    return read_chunk_rows(batch, plan.chunks, plan.schema, output), plan, chunks


def test_planning_reads_the_head_and_the_read_counts_the_rest(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards")  # shard-0: 4 samples, shard-1: 2
    source = [SourceConfig(path=str(tmp_path / "shards"), format="webdataset")]
    counted, _ = read_all(source)
    monkeypatch.setattr(webdataset, "HEAD_SAMPLES", 2)
    table, plan, chunks = read_counted_on_read(source)
    assert chunks.chunks.column("counted").to_pylist() == [False, True]  # shard-1 ends within its head
    estimate = chunks.chunks.column("rows")[0].as_py()
    assert estimate >= 3 and plan.uncounted == {chunks.chunks.column("key")[0].as_py(): (0, estimate)}
    assert table.drop_columns([CHUNK_COLUMN]).equals(counted)  # same rows, columns and errors
    tags = dict(zip(*pc.value_counts(table.column(CHUNK_COLUMN)).flatten()))
    shard0 = chunks.chunks.column("key")[0].as_py()
    assert {t.as_py(): n.as_py() for t, n in tags.items()} == {f"{shard0} 4": 4, chunks.chunks["key"][1].as_py(): 2}
    # The count the read found replaces the estimate.
    settled = plan.settled({shard0: 4})
    assert settled.rows == 6 and settled.to_embed == 6 and not settled.uncounted


def test_a_break_past_the_head_is_found_by_the_read(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards")
    path = tmp_path / "shards" / "shard-0.tar"
    with tarfile.open(path) as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "000002.json").offset_data + 3
    path.write_bytes(path.read_bytes()[:cut_at])  # inside sample 000002's last member
    monkeypatch.setattr(webdataset, "HEAD_SAMPLES", 1)
    table, plan, chunks = read_counted_on_read([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")])
    assert chunks.warnings == []  # planning did not reach the break
    assert table.column("id").to_pylist() == ["000000", "000001", "part/000004", "part/000005"]
    counts, totals, breaks = parse_tags(
        {t["values"]: t["counts"] for t in pc.value_counts(table.column(CHUNK_COLUMN)).to_pylist()}
    )
    shard0 = chunks.chunks.column("key")[0].as_py()
    assert counts[shard0] == 2 and totals[shard0] == 2 and sorted(totals.values()) == [2, 2]  # both past the head
    assert list(breaks) == [shard0]
    assert breaks[shard0].startswith("shard-0.tar: the shard breaks after 2 complete samples (member '000002.json'")


def write_caption_shards(folder, n_shards=3, per_shard=30):
    """Captions from Python's own docstrings, ``per_shard`` samples a shard."""
    lines = docstring_lines(21)
    folder.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:04d}"
                add(tar, f"{key}.txt", lines[(s * per_shard + i) % len(lines)].encode())
                add(tar, f"{key}.json", json.dumps({"shard": s, "i": i}).encode())


def test_trusted_shards_run_resume_and_report_a_break(ray_session, tiny_bert, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(webdataset, "HEAD_SAMPLES", 4)  # planning runs on the driver for a few files
    shards, out = tmp_path / "shards", tmp_path / "out"
    write_caption_shards(shards)
    args = ["embed", str(shards), "--format", "webdataset", "--text-column", "txt", "--text-model", tiny_bert]
    args += ["--output", str(out), "--on-duplicate-id", "trust", "--rows-per-file", "8"]
    assert cli_main([*args, "--dry-run"]) == 0
    assert '"shards_counted_on_read": 3' in capsys.readouterr().out
    assert cli_main(args) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == manifest["input_rows"] == 90
    assert manifest["planned_rows"] == 90
    assert {k for f in manifest["files"] for k in f.get("totals", {})} == {
        k for f in manifest["files"] for k in f["chunks"]
    }
    assert {n for f in manifest["files"] for n in f["totals"].values()} == {30}

    # A driver that died before recording its last part: the resumed run knows every count.
    lost = manifest["files"].pop()["rows"] + manifest["files"].pop()["rows"]
    manifest["status"] = "running"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert cli_main(args) == 0
    resumed = json.loads((out / "_manifest.json").read_text())
    assert resumed["status"] == "complete" and resumed["rows"] == 90
    assert resumed["timing"]["rows_this_run"] == lost
    table = pq.read_table(out)
    assert table.num_rows == 90 and pc.count_distinct(table.column("id")).as_py() == 90

    # A shard cut after its head: its complete samples are embedded, the break is one line.
    path = shards / "shard-001.tar"
    with tarfile.open(path) as tar:
        cut_at = next(m for m in tar.getmembers() if m.name == "0010020.txt").offset_data + 2
    path.write_bytes(path.read_bytes()[:cut_at])
    capsys.readouterr()
    assert cli_main([*args, "--overwrite"]) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == manifest["input_rows"] == 80
    (warning,) = manifest["warnings"]
    assert warning.startswith("shard-001.tar: the shard breaks after 20 complete samples")
    assert warning in capsys.readouterr().out  # the summary's warning line


@pytest.mark.parametrize("policy", ["error", "keep-first"])
def test_other_policies_still_scan_every_header(tmp_path, monkeypatch, policy):
    write_shards(tmp_path / "shards")
    monkeypatch.setattr(webdataset, "HEAD_SAMPLES", 1)
    _, plan = read_all([SourceConfig(path=str(tmp_path / "shards"), format="webdataset")], on_duplicate_id=policy)
    assert plan.rows == 6 and not plan.uncounted
