"""A source's ``path:`` as a list: one source (one index, one id space, one format) whose
relative paths start at the elements' common folder; errors name the element."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.chunks import plan_sources
from pipeline.cli import build_parser, config_from_flags
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, SourceConfig, config_from_dict
from pipeline.preflight import sources_digest
from pipeline.source_paths import source_root
from pipeline.tasks import LocalTasks
from tests.pipeline.test_preflight import no_ray, run  # noqa: F401 (a fixture)
from tests.pipeline.test_sources import read_all
from tests.pipeline.test_webdataset import CAPTIONS, add, write_shards


def plan(*paths, **fields):
    return plan_sources([SourceConfig(path=tuple(map(str, paths)), **fields)], LocalTasks())


def test_a_list_of_shards_plans_and_reads_as_a_glob_over_them(tmp_path):
    write_shards(tmp_path / "shards")
    listed = SourceConfig(path=tuple(str(tmp_path / "shards" / f"shard-{i}.tar") for i in (0, 1)), format="webdataset")
    globbed = SourceConfig(path=str(tmp_path / "shards" / "shard-*.tar"), format="webdataset")
    table, chunks = read_all([listed])
    expected, expected_chunks = read_all([globbed])
    assert table.equals(expected) and table.num_rows == 6
    assert chunks.chunks.column("relpath").to_pylist() == ["shard-0.tar", "shard-1.tar"]
    assert chunks.chunks.column("source").to_pylist() == [0, 0]  # one source
    assert chunks.chunks.column("key").equals(expected_chunks.chunks.column("key"))  # same rels, same keys


def test_a_key_in_two_elements_is_a_duplicate_and_keep_first_keeps_the_first_elements(tmp_path):
    write_shards(tmp_path / "shards")
    (tmp_path / "more").mkdir()
    with tarfile.open(tmp_path / "more" / "again.tar", "w") as tar:
        add(tar, "000000.txt", b"again")
    source = SourceConfig(path=(str(tmp_path / "shards" / "shard-0.tar"), str(tmp_path / "more" / "*.tar")))
    with pytest.raises(ConfigError, match="1 ids occur more than once .e.g. '000000'."):
        read_all([source])
    table, result = read_all([source], on_duplicate_id="keep-first")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert result.duplicates == 1 and table.column("id").to_pylist().count("000000") == 1
    assert rows["000000"]["txt"] == CAPTIONS[0]
    rels = plan_sources([source], LocalTasks()).chunks.column("relpath").to_pylist()
    assert rels == ["shards/shard-0.tar", "more/again.tar"]  # from the common folder of shards/ and more/


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_a_list_of_table_files_is_one_source_of_each_format(tmp_path, fmt):
    paths = []
    for year in ("2023", "2024"):
        (tmp_path / year).mkdir()
        rows = pa.table({"sku": [f"{year}-{i}" for i in range(2)], "title": [f"{year} {i}" for i in range(2)]})
        path = tmp_path / year / f"items.{fmt}"
        if fmt == "parquet":
            pq.write_table(rows, path)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows.to_pylist()))
        else:
            path.write_text("sku,title\n" + "".join(f"{r['sku']},{r['title']}\n" for r in rows.to_pylist()))
        paths.append(str(path))
    table, _ = read_all([SourceConfig(path=tuple(paths), id_column="sku")])
    assert table.column("id").to_pylist() == ["2023-0", "2023-1", "2024-0", "2024-1"]
    derived, _ = read_all([SourceConfig(path=tuple(paths), derive_ids=True)])
    assert derived.column("id").to_pylist() == [f"{y}/items.{fmt}:{r}" for y in ("2023", "2024") for r in (0, 1)]


def test_a_list_of_image_folders_gives_ids_from_their_common_folder(tmp_path):
    for year in ("2023", "2024"):
        (tmp_path / "photos" / year).mkdir(parents=True)
        (tmp_path / "photos" / year / "x.png").write_bytes(b"png")
    folders = tuple(str(tmp_path / "photos" / y) for y in ("2023", "2024"))
    table, _ = read_all([SourceConfig(path=folders, kind="image")])
    assert table.column("id").to_pylist() == ["2023/x.png", "2024/x.png"]
    assert table.column("image").to_pylist() == [str(tmp_path / "photos" / y / "x.png") for y in ("2023", "2024")]


def test_planning_errors_name_the_element(tmp_path):
    write_shards(tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-0.tar"
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "items.parquet")
    cases = [
        ((shard, tmp_path / "missing.tar"), r"sources\[0\].path\[1\]: '.*missing.tar' does not exist"),
        ((shard, tmp_path / "x" / "*.tar"), r"sources\[0\].path\[1\]: no file matches '.*x/\*.tar'"),
        ((shard, tmp_path / "shards" / "*.zip"), r"sources\[0\].path\[1\]: no file matches"),
        ((shard, tmp_path / "items.parquet"), r"sources\[0\].path\[1\]: '.*items.parquet' is parquet, but path\[0\]"),
        (
            (tmp_path / "shards" / "*.tar", shard),
            r"sources\[0\].path\[1\]: '.*shard-0.tar' reaches 'shards/shard-0.tar', which path\[0\] reaches too",
        ),
    ]
    for paths, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            plan(*paths)
        assert "\n" not in str(info.value)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.png").write_bytes(b"png")
    with pytest.raises(ConfigError, match=r"sources\[0\].path\[1\]: a image source must be a folder, got a file"):
        plan(tmp_path / "photos", shard, kind="image")


@pytest.mark.parametrize(
    "path, message",
    [
        ([], r"sources\[0\].path must be a path or a list of paths, got \[\]"),
        (["a.tar", 3], r"sources\[0\].path must be a path or a list of paths; path\[1\] is 3"),
        (["a.tar", ""], r"sources\[0\].path must be a path or a list of paths; path\[1\] is ''"),
        ({"a": 1}, r"sources\[0\].path must be a path or a list of paths"),
        (["s3://b/a.tar", "s3://b/c.tar", "s3://other/x.tar"], r"sources\[0\].path\[2\]: 's3://other/x.tar' is on"),
        (["a.tar", "s3://b/c.tar"], r"sources\[0\].path\[1\]: 's3://b/c.tar' is on another filesystem than path\[0\]"),
    ],
)
def test_config_refuses_what_is_not_a_list_of_paths_on_one_filesystem(path, message):
    data = {"sources": [{"path": path}], "encoders": [{"output": "t", "model": "m", "column": "t"}]}
    data["output"] = {"path": "out"}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_config_keeps_a_list_as_a_tuple_and_writes_it_back_as_a_list():
    data = {
        "sources": [{"path": ["a.tar", "file:///x/b.tar"], "format": "webdataset"}, {"path": "c.parquet"}],
        "encoders": [{"output": "t", "model": "m", "column": "t"}],
        "output": {"path": "out"},
    }
    config = config_from_dict(data)
    assert config.sources[0].path == ("a.tar", "file:///x/b.tar") and config.sources[0].paths == config.sources[0].path
    assert config.sources[1].paths == ("c.parquet",)
    assert config.to_dict()["sources"][0]["path"] == ["a.tar", "file:///x/b.tar"]


def test_several_inputs_on_the_command_line_are_one_list_source():
    def source(*inputs):
        flags = ["--output", "o", "--format", "webdataset", "--text-column", "txt", "--text-model", "m"]
        return config_from_dict(config_from_flags(build_parser().parse_args(["embed", *inputs, *flags]))).sources

    assert source("a.tar", "b.tar") == (SourceConfig(path=("a.tar", "b.tar"), format="webdataset"),)
    assert source("a.tar") == (SourceConfig(path="a.tar", format="webdataset"),)


def test_preflight_names_the_element_before_ray(no_ray, tiny_bert, tmp_path, capsys):  # noqa: F811
    write_shards(tmp_path / "shards")
    shard = tmp_path / "shards" / "shard-0.tar"
    flags = ["--format", "webdataset", "--text-column", "txt", "--text-model", tiny_bert, "--output", tmp_path / "o"]
    code, line = run(capsys, shard, tmp_path / "missing.tar", *flags)
    assert code == 2 and line.startswith("omniembed: error: input[1]: ") and "missing.tar' does not exist" in line
    code, line = run(capsys, shard, tmp_path / "x" / "*.tar", *flags)
    assert code == 2 and line.startswith("omniembed: error: input[1]: no file matches "), line


def test_the_digest_covers_every_element(tmp_path):
    write_shards(tmp_path / "shards")
    shards = tuple(str(tmp_path / "shards" / f"shard-{i}.tar") for i in (0, 1))
    digest = sources_digest([SourceConfig(path=shards)])
    assert digest is not None and digest != sources_digest([SourceConfig(path=shards[:1])])
    with tarfile.open(shards[1], "a") as tar:
        add(tar, "000099.txt", b"new")
    assert sources_digest([SourceConfig(path=shards)]) != digest
    assert sources_digest([SourceConfig(path=(shards[0], "s3://bucket/x.tar"))]) is None


def test_a_run_over_a_list_of_shards(ray_session, tiny_bert, tmp_path):
    write_shards(tmp_path / "shards")
    out = tmp_path / "out"
    shards = [str(tmp_path / "shards" / f"shard-{i}.tar") for i in (0, 1)]
    flags = ["--format", "webdataset", "--text-column", "txt", "--text-model", tiny_bert, "--max-error-rate", "0.9"]
    assert cli_main(["embed", *shards, "--output", str(out), *flags]) == 0
    ids = sorted(pq.read_table(out, columns=["id"]).column("id").to_pylist())
    assert ids == ["000000", "000001", "000002", "000003", "part/000004", "part/000005"]


def test_a_list_of_uris_shares_the_root_of_their_folders():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for name in ("lists/a/items.jsonl", "lists/b/more.jsonl"):
        with fs.open(f"/{name}", "w") as handle:
            handle.write(json.dumps({"text": name}) + "\n")
    source = SourceConfig(path=("memory://lists/a/items.jsonl", "memory://lists/b/*.jsonl"), derive_ids=True)
    assert source_root(source) == "memory://lists"
    table, _ = read_all([source])
    assert table.column("id").to_pylist() == ["a/items.jsonl:0", "b/more.jsonl:0"]
    assert source_root(SourceConfig(path=("s3://b/x/a.tar", "s3://b/x/c.tar"))) == "s3://b/x"
    assert source_root(SourceConfig(path=("s3://b/x/a.tar", "s3://b/y/*.tar"))) == "s3://b"
    assert source_root(SourceConfig(path="s3://b/y/*.tar")) == "s3://b/y"  # a single path: as always
