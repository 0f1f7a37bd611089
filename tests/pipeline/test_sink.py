"""The sink's commit protocol: unambiguous part names, an append-only commit log compacted
into the manifest, resume from a killed run's log, and exactly-once checked at close."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli_main
from pipeline.commits import COMMITS
from pipeline.config import ConfigError, config_from_dict
from pipeline.lease import LEASE, WriterLease
from pipeline.sink import FORMAT_VERSION, ParquetSink, committed_parts, part_name
from tests.conftest import own_stderr
from tests.pipeline.test_run import embed_args, read_output


def test_part_names_cannot_collide():
    # The old name hashed "\n".join(ids): these two different parts shared it.
    assert "\n".join(["a\nb"]) == "\n".join(["a", "b"])
    assert part_name(["a\nb"]) != part_name(["a", "b"])
    assert part_name(["", "ab"]) != part_name(["a", "b"]) != part_name(["ab"])
    assert part_name(["x", "y"]) == part_name(["x", "y"]) != part_name(["y", "x"])  # a retry gets the same name
    assert part_name(["x"]).startswith("part-") and part_name(["x"]).endswith(".parquet")


def _sink(tmp_path, commit_seconds: float = 0.0, expect: dict | None = None) -> ParquetSink:
    config = config_from_dict(
        {
            "sources": [{"path": str(tmp_path / "in.parquet")}],
            "encoders": [{"output": "t", "column": "text", "model": "m"}],
            "output": {"path": str(tmp_path / "out"), "commit_seconds": commit_seconds},
        }
    )
    sink = ParquetSink(config, {}, "fp")
    assert sink.check(overwrite=False) is None
    sink.begin(expect or {"c": 1000})
    return sink


def _part(name: str, rows: int, chunk: str = "c") -> dict:
    errors = json.dumps({"empty_text": 1})
    return {"name": name, "rows": rows, "rows_with_errors": 1, "errors": errors, "chunks": json.dumps({chunk: rows})}


def test_commits_append_to_the_log_and_compact_into_the_manifest(tmp_path):
    sink = _sink(tmp_path)
    out = tmp_path / "out"
    before = (out / "_manifest.json").read_text()
    for i in range(3):
        sink.record(_part(f"part-{i}.parquet", 10))
    sink.record(_part("part-1.parquet", 10))  # a retried write task: committed once
    # Each commit is a new small segment; the manifest is not rewritten per part.
    segments = sorted((out / COMMITS).glob("*.jsonl"))
    assert len(segments) == 3 and all(len(s.read_text().splitlines()) == 1 for s in segments)
    assert (out / "_manifest.json").read_text() == before
    assert [p["name"] for p in committed_parts(str(out))] == [f"part-{i}.parquet" for i in range(3)]

    manifest = sink.close(input_rows=30, max_error_rate=0.5, planned_rows=30)
    assert manifest["status"] == "complete" and manifest["rows"] == 30 and manifest["version"] == FORMAT_VERSION
    assert not (out / COMMITS).exists()
    assert json.loads((out / "_manifest.json").read_text())["files"] == manifest["files"]


def test_the_log_flushes_on_its_period(tmp_path):
    sink = _sink(tmp_path, commit_seconds=3600)
    for i in range(5):
        sink.record(_part(f"part-{i}.parquet", 1))
    assert not (tmp_path / "out" / COMMITS).exists()  # held for the period: at most this much is lost
    sink.log.flush()
    assert len(committed_parts(str(tmp_path / "out"))) == 5


def test_close_detects_rows_that_never_committed(tmp_path):
    sink = _sink(tmp_path)
    sink.record(_part("part-a.parquet", 10))
    manifest = sink.close(input_rows=30, max_error_rate=1.0, planned_rows=30)
    assert manifest["status"] == "incomplete" and manifest["planned_rows"] == 30 and manifest["rows"] == 10


def test_a_part_that_overlaps_committed_rows_of_a_chunk_is_refused(tmp_path, caplog):
    sink = _sink(tmp_path, expect={"c": 25, "d": 5})
    sink.record(_part("part-a.parquet", 20))
    sink.record(_part("part-b.parquet", 10))  # 30 rows of a chunk that has 25 left: some twice
    sink.record(_part("part-c.parquet", 5, chunk="d"))
    assert "part-b.parquet overlaps committed rows of read chunk c" in caplog.text
    manifest = sink.close(input_rows=30, max_error_rate=1.0, planned_rows=30)
    assert [f["name"] for f in manifest["files"]] == ["part-a.parquet", "part-c.parquet"]
    assert manifest["status"] == "incomplete" and manifest["files"][0]["chunks"] == {"c": 20}


def _input(tmp_path, n: int = 90):
    src = tmp_path / "in.parquet"
    ids = [f"r{i:03d}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": [f"the blue mug {i}" for i in range(n)]}), src)
    return src


def test_a_lost_commit_ends_incomplete_with_exit_code_4(ray_session, tiny_bert, tmp_path, monkeypatch):
    src, out = _input(tmp_path), tmp_path / "out"
    real, arrived = ParquetSink.record, []

    def lossy(self, part):  # the second part's commit never reaches the driver
        arrived.append(part["name"])
        if len(arrived) != 2:
            real(self, part)

    monkeypatch.setattr(ParquetSink, "record", lossy)
    assert cli_main(embed_args(src, out, tiny_bert, "--rows-per-file", "30")) == 4
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "incomplete" and manifest["rows"] < manifest["planned_rows"] == 90


def test_resume_from_a_killed_runs_commit_log(ray_session, tiny_bert, tmp_path):
    src, out = _input(tmp_path), tmp_path / "out"
    args = embed_args(src, out, tiny_bert, "--rows-per-file", "30")
    assert cli_main(args) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    first, second, third = manifest["files"]
    # Killed after the log recorded the second part and the third was moved in unrecorded.
    manifest.update(status="running", files=[first])
    (out / "_manifest.json").write_text(json.dumps(manifest))
    (out / COMMITS).mkdir()
    (out / COMMITS / "20260101T000000-dead0000-000001.jsonl").write_text(json.dumps(second) + "\n")
    assert cli_main(args) == 0
    resumed = json.loads((out / "_manifest.json").read_text())
    assert resumed["status"] == "complete" and resumed["resumed_from"] == 2
    assert resumed["timing"]["rows_this_run"] == third["rows"] and resumed["rows"] == 90
    table = read_output(out)
    assert table.num_rows == 90 and pc.count_distinct(table.column("id")).as_py() == 90
    assert not (out / COMMITS).exists()


def test_older_output_format_and_missing_parts_refuse_to_resume(ray_session, tiny_bert, tmp_path, capsys):
    src, out = _input(tmp_path, 40), tmp_path / "out"
    args = embed_args(src, out, tiny_bert, "--rows-per-file", "20")
    assert cli_main(args) == 0
    manifest = json.loads((out / "_manifest.json").read_text())

    (out / "_manifest.json").write_text(json.dumps({**manifest, "version": "1", "status": "running"}))
    capsys.readouterr()
    assert cli_main(args) == 2
    (err,) = own_stderr(capsys.readouterr().err)
    assert "output format '1'" in err and "--overwrite" in err

    (out / "_manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    (out / manifest["files"][0]["name"]).unlink()
    assert cli_main(args) == 2
    (err,) = own_stderr(capsys.readouterr().err)
    assert manifest["files"][0]["name"] in err and "missing" in err
    assert cli_main([*args, "--overwrite"]) == 0
    assert read_output(out).num_rows == 40


def test_close_sweeps_parts_no_commit_lists(tmp_path):
    sink = _sink(tmp_path)
    out = tmp_path / "out"
    (out / "part-committed.parquet").write_bytes(b"x")
    (out / "part-zombie.parquet").write_bytes(b"x")  # moved in by a killed driver's zombie task
    sink.record(_part("part-committed.parquet", 5))
    sink.close(input_rows=5, max_error_rate=1.0, planned_rows=5)
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json", "part-committed.parquet"]


def test_dry_run_counts_and_writes_nothing(ray_session, tiny_bert, tmp_path, capsys):
    src, out = tmp_path / "in.parquet", tmp_path / "out"
    ids = [f"r{i:02d}" for i in range(60)] + ["r00", "r01", "r02"]  # three duplicates
    pq.write_table(pa.table({"id": ids, "text": [f"red shoe {i}" for i in range(63)]}), src)
    args = embed_args(src, out, tiny_bert, "--rows-per-file", "20", "--on-duplicate-id", "keep-first")
    capsys.readouterr()
    assert cli_main([*args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    fresh = json.loads(lines[0])
    assert {k: fresh[k] for k in ("rows", "duplicates", "committed", "to_embed")} == {
        "rows": 63,
        "duplicates": 3,
        "committed": 0,
        "to_embed": 60,
    }
    assert fresh["chunks"] >= 1 and fresh["driver_peak_rss_mb"] > 0
    assert not out.exists()

    assert cli_main(args) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    # Half committed: the manifest of a killed run that recorded its first parts only.
    kept = manifest["files"][: len(manifest["files"]) // 2]
    (out / "_manifest.json").write_text(json.dumps({**manifest, "status": "running", "files": kept}))
    listing = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    capsys.readouterr()
    assert cli_main([*args, "--dry-run"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["committed"] == sum(f["rows"] for f in kept) and resumed["to_embed"] == 60 - resumed["committed"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == listing  # nothing written

    # Duplicates under on_duplicate_id: error stop the dry run as they stop the run.
    strict = embed_args(src, tmp_path / "strict", tiny_bert, "--dry-run")
    assert cli_main(strict) == 2 and not (tmp_path / "strict").exists()


def test_job_entry_point_dry_run(ray_session, tiny_bert, tmp_path, capsys):
    from jobs.embed import main as job_main

    src = _input(tmp_path, 30)
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "sources": [{"path": str(src), "id_column": "id"}],
                "encoders": [{"output": "text", "column": "text", "model": tiny_bert}],
                "output": {"path": str(tmp_path / "out")},
            }
        )
    )
    capsys.readouterr()
    assert job_main(["--config", str(config), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["to_embed"], report["committed"]) == (30, 30, 0)
    assert not (tmp_path / "out").exists()


def _foreign_lease(out, age_seconds: float, seconds: float = 10.0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lease = {
        "run_id": "20260101T000000-other000",
        "host": "node-7",
        "pid": 4242,
        "seconds": seconds,
        "heartbeat": time.time() - age_seconds,
    }
    (out / LEASE).write_text(json.dumps(lease))


def test_writer_lease_renews_refuses_and_goes_stale(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    mine = WriterLease(fs, root, "mine", seconds=0.05)
    mine.acquire()
    first = mine.holder()["heartbeat"]
    time.sleep(0.3)
    assert mine.holder()["heartbeat"] > first and mine.holder()["run_id"] == "mine"  # renewed
    other = WriterLease(fs, root, "other", seconds=0.05)
    with pytest.raises(ConfigError) as info:
        other.check("output.path: 'x'", takeover=False)
    message = str(info.value)
    assert "\n" not in message and "run mine" in message and "last heartbeat" in message and "--takeover" in message
    other.check("output.path: 'x'", takeover=True)  # --takeover: no refusal
    mine.release()
    assert not (tmp_path / LEASE).exists()
    _foreign_lease(tmp_path, age_seconds=1.0, seconds=0.1)  # 10 heartbeats old: the run died
    other.check("output.path: 'x'", takeover=False)


def test_a_second_writer_is_refused_and_a_run_releases_its_lease(ray_session, tiny_bert, tmp_path, capsys):
    src, out = _input(tmp_path, 20), tmp_path / "out"
    args = embed_args(src, out, tiny_bert)
    _foreign_lease(out, age_seconds=2.0)
    capsys.readouterr()
    assert cli_main(args) == 2
    (err,) = own_stderr(capsys.readouterr().err)
    assert "node-7" in err and "--takeover" in err
    assert cli_main([*args, "--takeover"]) == 0
    assert not (out / LEASE).exists() and read_output(out).num_rows == 20


def test_the_lease_is_released_on_ctrl_c(ray_session, tiny_bert, tmp_path, monkeypatch):
    from pipeline import graph

    src, out = _input(tmp_path, 10), tmp_path / "out"

    def interrupted(*args, **kwargs):
        assert (out / LEASE).exists()  # held while the run writes
        raise KeyboardInterrupt

    monkeypatch.setattr(graph, "write_parts", interrupted)
    config = {
        "sources": [{"path": str(src), "id_column": "id"}],
        "output": {"path": str(out)},
        "encoders": [{"output": "text", "column": "text", "model": tiny_bert}],
    }
    with pytest.raises(KeyboardInterrupt):
        graph.run(config)
    assert not (out / LEASE).exists()
