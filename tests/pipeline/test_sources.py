"""Sources without Ray: planning, the duplicate pass and resume accounting run their tasks in
a loop, and reads go through the same ``read_chunk_rows`` body that Ray Data maps over the
chunks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.chunks import ROWS_PER_PARQUET_CHUNK, plan_chunks, plan_sources
from pipeline.config import ConfigError, SourceConfig
from pipeline.dedupe import find_duplicates
from pipeline.progress import account
from pipeline.sources import CHUNK_COLUMN, read_chunk_rows
from pipeline.tasks import LocalTasks


def read_all(sources, records=None, on_duplicate_id="error", output="/nonexistent", ids_per_task=3):
    """Plan, dedupe (a shuffle over several map and reduce tasks) and read, as a run does."""
    tasks = LocalTasks()
    chunks = plan_sources(sources, tasks)
    duplicates = find_duplicates(chunks.chunks, on_duplicate_id, tasks, ids_per_task=ids_per_task)
    plan = account(chunks, duplicates, records, output, tasks)
    batch = pa.table({"id": list(range(plan.chunks.num_rows))})
    return read_chunk_rows(batch, plan.chunks, plan.schema, output).drop_columns([CHUNK_COLUMN]), plan


@pytest.fixture
def tables(tmp_path):
    rows = [{"sku": 100 + i, "title": f"item {i}", "price": float(i)} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "items.parquet")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "items.csv").write_text(
        "sku,title,price\n" + "".join(f"{r['sku']},{r['title']},{r['price']}\n" for r in rows)
    )
    return tmp_path


@pytest.mark.parametrize("name", ["items.parquet", "items.jsonl", "items.csv"])
def test_each_format_gives_string_ids_first(tables, name):
    table, plan = read_all([SourceConfig(path=str(tables / name), id_column="sku")])
    assert table.column_names[0] == "id" and table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == [str(100 + i) for i in range(6)]
    assert table.column("title").to_pylist() == [f"item {i}" for i in range(6)]
    assert "sku" not in table.column_names
    assert plan.unique_rows == 6


def test_folder_of_files_and_uri(tables, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        pq.write_table(
            pa.table({"id": [f"s{i}-{j}" for j in range(4)], "text": ["x"] * 4}), folder / f"part{i}.parquet"
        )
    (folder / "_SUCCESS").write_text("")
    table, _ = read_all([SourceConfig(path=str(folder), id_column="id")])
    assert table.num_rows == 12 and table.column("id").to_pylist()[:2] == ["s0-0", "s0-1"]
    uri_table, _ = read_all([SourceConfig(path=f"file://{folder}", id_column="id")])
    assert uri_table.equals(table)


def test_fsspec_uri(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/items.jsonl", "w") as handle:
        handle.write('{"id": "a", "text": "hello"}\n{"id": "b", "text": "world"}\n')
    table, _ = read_all([SourceConfig(path="memory://bucket/items.jsonl", id_column="id")])
    assert table.column("text").to_pylist() == ["hello", "world"]


def test_text_folder_ids_are_relative_paths(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_bytes(b"\xff\xfebad utf-8")
    (root / ".hidden.txt").write_text("skip me")
    table, _ = read_all([SourceConfig(path=str(root), kind="text")])
    assert table.column("id").to_pylist() == ["a.txt", "sub/b.txt"]
    # Bytes: invalid UTF-8 reaches the text stage, which records decode_failed.
    assert table.column("text").to_pylist() == [b"alpha", b"\xff\xfebad utf-8"]


def test_derived_ids_are_deterministic_and_span_row_groups(tmp_path):
    n = ROWS_PER_PARQUET_CHUNK + 10
    pq.write_table(
        pa.table({"text": [f"t{i}" for i in range(n)]}),
        tmp_path / "big.parquet",
        row_group_size=ROWS_PER_PARQUET_CHUNK // 2,
    )
    sources = [SourceConfig(path=str(tmp_path / "big.parquet"), derive_ids=True)]
    assert len(plan_chunks(sources)) == 2
    first, _ = read_all(sources)
    second, _ = read_all(sources)
    assert first.column("id").equals(second.column("id"))
    assert first.column("id")[n - 1].as_py() == f"big.parquet:{n - 1}"
    assert pc.count_distinct(first.column("id")).as_py() == n


def test_missing_id_column_and_null_ids_are_user_errors(tables, tmp_path):
    with pytest.raises(ConfigError, match=r"sources\[0\]: id_column is required"):
        plan_chunks([SourceConfig(path=str(tables / "items.parquet"))])
    with pytest.raises(ConfigError, match="'nope' is not a column"):
        read_all([SourceConfig(path=str(tables / "items.jsonl"), id_column="nope")])
    pq.write_table(pa.table({"id": ["a", None], "t": ["x", "y"]}), tmp_path / "nulls.parquet")
    with pytest.raises(ConfigError, match="null in 'nulls.parquet' row 1"):
        read_all([SourceConfig(path=str(tmp_path / "nulls.parquet"), id_column="id")])
    with pytest.raises(ConfigError, match="does not exist"):
        plan_chunks([SourceConfig(path=str(tmp_path / "missing.parquet"), id_column="id")])


def test_duplicates_error_or_keep_first(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "a"], "v": [1, 2, 3]}), tmp_path / "one.parquet")
    pq.write_table(pa.table({"id": ["b", "c"], "v": [4, 5]}), tmp_path / "two.parquet")
    sources = [
        SourceConfig(path=str(tmp_path / "one.parquet"), id_column="id"),
        SourceConfig(path=str(tmp_path / "two.parquet"), id_column="id"),
    ]
    with pytest.raises(ConfigError, match="2 ids occur more than once"):
        read_all(sources)
    table, plan = read_all(sources, on_duplicate_id="keep-first")
    assert sorted(zip(table.column("id").to_pylist(), table.column("v").to_pylist())) == [("a", 1), ("b", 2), ("c", 5)]
    assert plan.unique_rows == 3 and plan.duplicates == 2


def test_sources_with_different_columns_are_unified(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "title": ["x"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "title": ["y"], "brand": ["z"]}), tmp_path / "b.parquet")
    table, _ = read_all(
        [
            SourceConfig(path=str(tmp_path / "a.parquet"), id_column="id"),
            SourceConfig(path=str(tmp_path / "b.parquet"), id_column="id"),
        ]
    )
    assert table.column_names == ["id", "title", "brand"]
    assert table.column("brand").to_pylist() == [None, "z"]


def test_unreadable_table_is_a_one_line_user_error(tmp_path):
    (tmp_path / "mixed.jsonl").write_text('{"id": "a", "text": "hello"}\n{"id": "b", "text": 5}\n')
    with pytest.raises(ConfigError, match=r"cannot read 'mixed.jsonl' as jsonl: .*changed from string to number"):
        read_all([SourceConfig(path=str(tmp_path / "mixed.jsonl"), id_column="id")])


def test_csv_is_read_as_written(tmp_path):
    """Type inference would turn 00123 into 123 (colliding with 123) and 1e3 into 1000."""
    (tmp_path / "ids.csv").write_text("sku,code,qty\n00123,1e3,5\n123,007,6\n")
    table, plan = read_all([SourceConfig(path=str(tmp_path / "ids.csv"), id_column="sku")])
    assert table.column("id").to_pylist() == ["00123", "123"] and plan.duplicates == 0
    assert table.column("code").to_pylist() == ["1e3", "007"] and table.schema.field("qty").type == pa.string()
    typed, _ = read_all([SourceConfig(path=str(tmp_path / "ids.csv"), id_column="sku", infer_types=True)])
    assert typed.column("id").to_pylist() == ["00123", "123"]  # the id column stays text
    assert typed.column("qty").to_pylist() == [5, 6]


def test_derived_ids_of_two_sources_get_their_paths_only_when_they_collide(tmp_path):
    for year in ("2023", "2024"):
        (tmp_path / year).mkdir()
        pq.write_table(pa.table({"text": [f"{year} a", f"{year} b"]}), tmp_path / year / "part-0.parquet")
    sources = [SourceConfig(path=str(tmp_path / y / "part-0.parquet"), derive_ids=True) for y in ("2023", "2024")]
    table, plan = read_all(sources)
    assert table.column("id").to_pylist() == [f"{y}/part-0.parquet:{r}" for y in ("2023", "2024") for r in (0, 1)]
    alone, _ = read_all(sources[:1])  # one derived-id source: ids as they always were
    assert alone.column("id").to_pylist() == ["part-0.parquet:0", "part-0.parquet:1"]
    for name in ("a", "b"):  # two image folders that both hold 0001.jpg
        (tmp_path / "img" / name).mkdir(parents=True)
        (tmp_path / "img" / name / "0001.jpg").write_bytes(b"jpeg")
    folders = [SourceConfig(path=str(tmp_path / "img" / n), kind="image") for n in ("a", "b")]
    table, _ = read_all(folders)
    assert table.column("id").to_pylist() == ["a/0001.jpg", "b/0001.jpg"]
    # The same folder twice still collides; the error never suggests keep-first for derived ids.
    with pytest.raises(ConfigError, match="derived from file paths repeat: give the sources an id_column") as info:
        read_all([folders[0], folders[0]])
    assert "keep-first" not in str(info.value)


def test_a_file_damaged_or_gone_after_planning_stops_in_one_line_naming_it(tmp_path):
    from pipeline.sources import read_chunk

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), tmp_path / "t.parquet")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "one.txt").write_text("one")
    chunks = plan_chunks([SourceConfig(path=str(tmp_path / "t.parquet"), id_column="id")])
    folder = plan_chunks([SourceConfig(path=str(docs), kind="text")])
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[:4] + b"\0" * (len(data) - 8) + data[-4:])  # pages zeroed
    (docs / "one.txt").unlink()
    for chunk, name in ((chunks[0], "t.parquet"), (folder[0], "one.txt")):
        with pytest.raises(ConfigError) as info:
            read_chunk(chunk)
        message = str(info.value)
        assert "\n" not in message and name in message and "run again to resume" in message
