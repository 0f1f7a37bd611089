"""Reading a row's file by URI: one filesystem per bucket and process, retries on transient
errors, and a missing object as ``missing_file``."""

from __future__ import annotations

import pytest

from encoders.core import files, retry
from encoders.core.files import RowError, read_bytes


def test_one_filesystem_per_bucket_not_per_row(monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for i in range(5):
        memory.pipe(f"/photos-cache-test/{i}.bin", bytes([i + 1]) * 3)
    built = []
    real = fsspec.core.url_to_fs
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: built.append(url) or real(url, **kw))
    monkeypatch.setattr(files, "_FILESYSTEMS", {})
    assert [read_bytes(f"memory://photos-cache-test/{i}.bin") for i in range(5)] == [
        bytes([i + 1]) * 3 for i in range(5)
    ]
    assert len(built) == 1  # the first row builds it; the other rows reuse it
    with pytest.raises(RowError) as info:
        read_bytes("memory://photos-cache-test/absent.bin")
    assert info.value.code == "missing_file"


def test_a_transient_error_reading_a_row_is_retried(monkeypatch):
    monkeypatch.setattr(retry, "FIRST_WAIT_SECONDS", 0.0)
    calls = []

    def flaky(value, max_bytes=None):
        calls.append(value)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation")
        return b"image bytes"

    monkeypatch.setattr(files, "_read_all", flaky)
    assert read_bytes("s3://bucket/a.jpg") == b"image bytes" and len(calls) == 3
