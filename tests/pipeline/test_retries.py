"""Transient storage errors are retried with backoff, in the driver and in Ray workers; other
errors are raised at once; a protocol with no installed backend is a one-line user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from encoders.core import retry
from pipeline.config import ConfigError
from pipeline.filesystems import check_filesystems

ROOT = Path(__file__).resolve().parents[2]
SLOW_DOWN = "AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate (HTTP status 503)"


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(retry, "FIRST_WAIT_SECONDS", 0.0)
    monkeypatch.setattr(retry, "RETRIED_IO_ERRORS", retry.RETRIED_IO_ERRORS)  # restored after configure()


def flaky(failures: int, error: Exception):
    calls = []

    def fn(x):
        calls.append(x)
        if len(calls) <= failures:
            raise error
        return x * 2

    return fn, calls


def test_transient_errors_are_retried_and_others_raised_at_once(no_wait):
    fn, calls = flaky(2, OSError(SLOW_DOWN))
    assert retry.retrying(fn, 21) == 42 and len(calls) == 3
    fn, calls = flaky(2, FileNotFoundError("no such key"))
    with pytest.raises(FileNotFoundError):
        retry.retrying(fn, 1)
    assert len(calls) == 1  # not transient: no second try
    fn, calls = flaky(99, OSError(SLOW_DOWN))
    with pytest.raises(OSError, match="SLOW_DOWN"):
        retry.retrying(fn, 1)
    assert len(calls) == retry.ATTEMPTS
    retry.configure([r"HTTP status 5\d\d"])  # the run's own patterns (Ray Data's retried_io_errors), as regex
    fn, calls = flaky(1, OSError("GET failed: HTTP status 502"))
    assert retry.retrying(fn, 1) == 2 and len(calls) == 2


def test_a_protocol_without_a_backend_is_one_line_before_ray_starts():
    with pytest.raises(ConfigError, match=r"'nosuch://bucket/x': no filesystem for nosuch:// \(Protocol not known"):
        check_filesystems(["in.parquet", "nosuch://bucket/x"])


# Registered in every process of the run (the driver and Ray's workers import sitecustomize at
# start): a local-disk fsspec protocol whose 2nd and 3rd opens fail with S3's SLOW_DOWN. The
# count is in a file, which all processes share.
FLAKY_FS = """
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FlakyFileSystem(LocalFileSystem):
    protocol = "flaky"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path[len("flaky://"):] if str(path).startswith("flaky://") else path)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            counter = os.environ["FLAKY_COUNTER"]
            with open(counter, "a+") as handle:
                handle.write("x")
            opens = os.path.getsize(counter)
            if opens in (2, 3):
                raise OSError("{error}")
        return super()._open(path, mode=mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
"""


def test_a_flaky_store_is_retried_in_ray_workers_and_every_id_lands_once(tiny_bert, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(FLAKY_FS.replace("{error}", SLOW_DOWN)))
    n = 50
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"a red mug {i}" for i in range(n)]}),
        tmp_path / "in.parquet",
    )
    counter, out = tmp_path / "opens", tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "FLAKY_COUNTER": str(counter),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("RAY_ADDRESS", None)  # an embedded Ray of its own, whose workers import the hook
    args = ["embed", f"flaky://{tmp_path / 'in.parquet'}", "--id-column", "id", "--text-column", "text"]
    args += ["--text-model", tiny_bert, "--output", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert counter.stat().st_size >= 4  # two opens failed, and the reads went on
    assert "transient storage error" in done.stderr  # retried where the open failed: a Ray worker
    table = pq.read_table(out, columns=["id", "text_error"])
    assert table.num_rows == n and pc.count_distinct(table["id"]).as_py() == n
    assert table["text_error"].null_count == n
    assert json.loads((out / "_manifest.json").read_text())["status"] == "complete"
