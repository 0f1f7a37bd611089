"""User errors found before Ray starts, with the CLI's own flag names (Ray's start is made to
fail, so an error that needed it would show as that failure instead)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ray_env
from pipeline.cli import main as cli_main


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a check that needs none")

    monkeypatch.setattr(ray_env, "init_ray", refuse)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"sku": ["a", "b"], "title": ["red shoe", "blue mug"]}), path)
    return path


def run(capsys, *argv):
    code = cli_main(["embed", *map(str, argv)])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not _ray_forwarded(line)]
    return code, err[-1] if err else ""


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--id-column", "sku", "--text-column", "title"], None),  # the good case is checked to fail only at Ray
        (["--text-column", "title"], "omniembed: error: --id-column is required (or --derive-ids for ids"),
        (["--id-column", "nope", "--text-column", "title"], "omniembed: error: --id-column: 'nope' is not a column"),
        (["--id-column", "sku", "--text-column", "name"], "omniembed: error: --text-column: 'name' is not a source"),
        (
            ["--id-column", "sku", "--text-column", "title", "--max-length", "1"],
            "omniembed: error: --text-model: max_length 1 is out",
        ),
    ],
)
def test_user_errors_stop_before_ray_naming_the_flag(no_ray, table, tiny_bert, tmp_path, capsys, flags, expected):
    argv = [table, "--output", tmp_path / "out", "--text-model", tiny_bert, *flags]
    if expected is None:
        with pytest.raises(AssertionError, match="Ray was started"):
            cli_main(["embed", *map(str, argv)])
        return
    code, line = run(capsys, *argv)
    assert code == 2 and line.startswith(expected), line


def test_a_missing_input_path_stops_before_ray(no_ray, tiny_bert, tmp_path, capsys):
    code, line = run(
        capsys,
        tmp_path / "nothing.parquet",
        "--output",
        tmp_path / "out",
        "--text-model",
        tiny_bert,
        "--text-column",
        "t",
        "--id-column",
        "id",
    )
    assert code == 2 and line.startswith("omniembed: error: input: ") and "does not exist" in line


def _ray_forwarded(line: str) -> bool:
    """A line Ray's log monitor forwards to the driver: ``(pid=...)`` or ``(Name pid=...)``,
    colored or not."""
    import re

    return re.match(r"^(\x1b\[[0-9;]*m)?\([^)]*pid=[^)]*\)", line) is not None


def test_ctrl_c_is_one_line_saying_what_is_committed(table, tiny_bert, tmp_path, capsys, monkeypatch):
    import pipeline.graph

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_env, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(pipeline.graph, "run", interrupted)
    out = tmp_path / "out"
    argv = ["embed", str(table), "--output", str(out), "--text-model", tiny_bert, "--text-column", "title"]
    assert cli_main([*argv, "--id-column", "sku"]) == 130
    # The session's Ray may forward a late log line of an earlier test's actors here
    # ("(pid=gcs_server) ... Failed to kill actor"): not this command's output.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not _ray_forwarded(line)]
    assert err == [
        f"omniembed: interrupted; 0 rows in 0 parts are committed in {out}; run the same command again to resume"
    ]


def test_a_run_shows_rows_progress_and_no_ray_noise(ray_session, table, tiny_bert, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "ERROR")  # what quiet_ray sets; restored after the test
    out = tmp_path / "out"
    argv = ["embed", str(table), "--output", str(out), "--text-model", tiny_bert, "--text-column", "title"]
    assert cli_main([*argv, "--id-column", "sku", "--progress-seconds", "0"]) == 0
    err = capfd.readouterr().err
    assert "omniembed: 2 of 2 rows (100.0%)" in err
    assert "core_worker.cc" not in err and "constructor arguments in the object store" not in err


def test_progress_lines_count_rows_against_the_plan():
    import io

    from pipeline.report import RowProgress

    stream = io.StringIO()
    progress = RowProgress(1000, interval=0, stream=stream)
    progress.started -= 10.0  # ten seconds in
    progress.add(250)
    line = stream.getvalue().strip()
    assert line.startswith("omniembed: 250 of 1,000 rows (25.0%), 25.") and line.endswith("rows/s, ETA 30s")
