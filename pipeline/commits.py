"""The commit log of one output folder: O(parts) bytes in all, however long the run.

Each committed part is one JSON line. The driver keeps the lines of the last
``flush_seconds`` in memory and writes them as one new segment file,
``_commits/<run id>-<sequence>.jsonl``. It never rewrites what it has already written. A run
compacts the log into ``_manifest.json`` when it begins and when it closes, then clears the
folder. So a finished output holds no log, and a killed run leaves a manifest plus the
segments written since.

A part whose line was still in memory when the driver died is not committed. The next run
removes it and embeds its rows again. A kill therefore loses at most ``flush_seconds`` of
commits. On object stores a segment is one PUT, which is atomic. On POSIX it is staged and
moved in.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Mapping

import pyarrow.fs as pafs

from pipeline.filesystems import get, join, put

COMMITS = "_commits"
FLUSH_SECONDS = 30.0


def new_run_id() -> str:
    """Sorts by start time across runs, unique within one second."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class CommitLog:
    def __init__(
        self, fs: pafs.FileSystem, root: str, staging: str, run_id: str, flush_seconds: float = FLUSH_SECONDS
    ) -> None:
        self.fs, self.folder, self.staging = fs, join(root, COMMITS), staging
        self.run_id, self.flush_seconds = run_id, flush_seconds
        self.pending: list[str] = []
        self.sequence = 0
        self.last_flush = time.monotonic()

    def read(self) -> list[dict[str, Any]]:
        """Every record of every segment, oldest segment first."""
        if self.fs.get_file_info(self.folder).type != pafs.FileType.Directory:
            return []
        entries = self.fs.get_file_info(pafs.FileSelector(self.folder))
        records = []
        for path in sorted(e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".jsonl")):
            records += [json.loads(line) for line in get(self.fs, path).decode().splitlines() if line.strip()]
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        self.pending.append(json.dumps(record, sort_keys=True))
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        self.sequence += 1
        name = f"{self.run_id}-{self.sequence:06d}.jsonl"
        data = ("\n".join(self.pending) + "\n").encode()
        self.fs.create_dir(self.folder, recursive=True)
        put(self.fs, join(self.folder, name), data, self.staging)  # readers never see half a segment
        self.pending = []

    def clear(self) -> None:
        """Drop the log once the manifest holds everything in it."""
        self.pending = []
        if self.fs.get_file_info(self.folder).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.folder)
