"""Progress per read chunk, without Ray: stable chunk keys, the hash-partitioned duplicate
pass, and resume accounting against committed parts (id-only part files and their records)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import chunks as chunks_module
from pipeline import progress
from pipeline.chunks import plan_sources
from pipeline.config import ConfigError, SourceConfig
from pipeline.dedupe import find_duplicates
from pipeline.sink import part_name
from pipeline.tasks import LocalTasks
from tests.pipeline.test_sources import read_all

TASKS = LocalTasks()


def write_ids(path, ids, **kwargs):
    pq.write_table(pa.table({"id": ids, "text": [f"t {i}" for i in ids]}), path, **kwargs)


def commit(out, ids, chunks):
    """A committed part as a run leaves it: a Parquet file in the output and its commit record."""
    out.mkdir(exist_ok=True)
    name = part_name(ids)
    pq.write_table(pa.table({"id": ids}), out / name)
    return {"name": name, "rows": len(ids), "rows_with_errors": 0, "errors": {}, "chunks": chunks}


def keys(sources):
    return plan_sources(sources, TASKS).chunks.column("key").to_pylist()


def test_chunk_keys_are_stable_and_follow_the_file_not_its_listing_position(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_ids(folder / "b.parquet", ["b1", "b2"])
    source = [SourceConfig(path=str(folder), id_column="id")]
    before = keys(source)
    assert keys(source) == before  # same files, same keys
    write_ids(folder / "a.parquet", ["a1"])  # listed first: positions shift, b's key does not
    after = keys(source)
    assert len(after) == 2 and after[1] == before[0]
    os.utime(folder / "b.parquet", ns=(1, 1))  # a changed file is a different chunk
    assert keys(source)[1] != before[0]


def test_folder_groups_are_content_defined(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks_module, "FILES_PER_CHUNK", 4)
    root = tmp_path / "docs"
    root.mkdir()
    for i in range(60):
        (root / f"f{i:03d}.txt").write_text(str(i))
    source = [SourceConfig(path=str(root), kind="text")]
    before = keys(source)
    assert len(before) > 3
    (root / "f030b.txt").write_text("new")  # an added file changes only the group it joins
    after = keys(source)
    assert len(set(before) - set(after)) <= 1 and 1 <= len(set(after) - set(before)) <= 2
    assert len(set(before) & set(after)) >= len(before) - 1


def test_duplicates_across_many_partitions_keep_the_first_by_source_file_and_row(tmp_path):
    write_ids(tmp_path / "a.parquet", [f"k{i}" for i in range(20)] + ["k3"])
    write_ids(tmp_path / "b.parquet", [f"k{i}" for i in range(15, 30)])
    sources = [SourceConfig(path=str(tmp_path / f), id_column="id") for f in ("b.parquet", "a.parquet")]
    table, plan = read_all(sources, on_duplicate_id="keep-first", ids_per_task=4)  # 12 partitions
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted({f"k{i}" for i in range(30)}) and plan.duplicates == 6
    texts = dict(zip(ids, table.column("text").to_pylist()))
    assert texts["k15"] == "t k15" and ids[:15] == [f"k{i}" for i in range(15, 30)]  # source b came first
    with pytest.raises(ConfigError, match=r"6 ids occur more than once \(e.g. 'k15', 'k16', 'k17'\)"):
        read_all(sources, ids_per_task=4)
    plan = plan_sources(sources, TASKS)
    trusted = find_duplicates(plan.chunks, "trust", TASKS)  # no pass: nothing read, nothing dropped
    assert trusted.count == 0 and trusted.drops.to_pylist() == [[], []]


def test_resume_skips_done_chunks_and_reads_only_the_rest_of_a_partly_done_one(tmp_path):
    src, out = tmp_path / "in.parquet", tmp_path / "out"
    ids = [f"r{i:02d}" for i in range(30)]
    write_ids(src, ids, row_group_size=10)
    source = [SourceConfig(path=str(src), id_column="id")]
    key = keys(source)[0]
    records = [commit(out, ids[:8], {key: 8}), commit(out, ids[20:24], {key: 4})]
    table, plan = read_all(source, records, output=str(out))
    assert table.column("id").to_pylist() == ids[8:20] + ids[24:]
    assert (plan.committed, plan.to_embed, plan.expect) == (12, 18, {key: 18})
    done = [*records, commit(out, ids[8:20] + ids[24:], {key: 18})]
    table, plan = read_all(source, done, output=str(out))
    assert table.num_rows == 0 and plan.chunks.num_rows == 0 and plan.committed == 30


def test_a_changed_file_is_replanned_by_id_or_refused(tmp_path, monkeypatch):
    src, out = tmp_path / "in.parquet", tmp_path / "out"
    ids = [f"r{i:02d}" for i in range(10)]
    write_ids(src, ids)
    source = [SourceConfig(path=str(src), id_column="id")]
    records = [commit(out, ids, {keys(source)[0]: 10})]
    write_ids(src, ids + ["r10", "r11"])  # rewritten with two more rows: a new size, a new key
    table, plan = read_all(source, records, output=str(out))
    assert table.column("id").to_pylist() == ["r10", "r11"] and plan.committed == 10
    monkeypatch.setattr(progress, "STALE_PARTS_LIMIT", 0)
    with pytest.raises(ConfigError, match=r"sources\[0\]: 1 read chunks changed .*restore the files, or pass"):
        read_all(source, records, output=str(out))


def test_more_committed_rows_than_a_chunk_holds_is_refused(tmp_path):
    src, out = tmp_path / "in.parquet", tmp_path / "out"
    write_ids(src, ["a", "b", "a"])
    source = [SourceConfig(path=str(src), id_column="id")]
    records = [commit(out, ["a", "b", "x"], {keys(source)[0]: 3})]
    with pytest.raises(ConfigError, match=r"holds 3 rows of a read chunk that now has 2"):
        read_all(source, records, on_duplicate_id="keep-first", output=str(out))
