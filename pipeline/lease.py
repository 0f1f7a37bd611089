"""One writer per output folder: a lease file, ``_lease.json``, that the writing driver renews.

The lease holds the run's id, its host and pid, and a heartbeat that a background thread
rewrites every ``seconds``. A second run into the same folder is refused with one line that
names the holder and its last heartbeat. A lease whose heartbeat is older than
``STALE_AFTER * seconds`` belonged to a run that died, and the next run takes it over.
``--takeover`` takes it at once, for the re-run of a driver the user knows is gone. A run
releases its lease when it ends, on success, on an error or on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import ConfigError
from pipeline.filesystems import get, join, put

LEASE = "_lease.json"
STALE_AFTER = 3  # heartbeats missed before a lease counts as abandoned


class WriterLease:
    def __init__(self, fs: pafs.FileSystem, root: str, run_id: str, seconds: float) -> None:
        self.fs, self.path, self.run_id, self.seconds = fs, join(root, LEASE), run_id, seconds
        self.root = root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        if self.fs.get_file_info(self.path).type != pafs.FileType.File:
            return None
        try:
            return json.loads(get(self.fs, self.path))
        except (OSError, ValueError):  # gone between the two calls: no lease to honour
            return None

    def check(self, where: str, takeover: bool) -> None:
        """Refuse (one line) while another run holds a fresh lease, unless ``takeover``."""
        holder = self.holder()
        if holder is None or takeover or holder.get("run_id") == self.run_id:
            return
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > STALE_AFTER * float(holder.get("seconds", self.seconds)):
            return
        raise ConfigError(
            f"{where} is being written by run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"last heartbeat {age:.0f} s ago); wait for it, or pass --takeover if that run is gone"
        )

    def acquire(self) -> None:
        """Write the lease and renew it every ``seconds`` until ``release``."""
        self._beat()
        self._thread = threading.Thread(target=self._renew, name="omniembed-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self.holder()
        if holder is not None and holder.get("run_id") == self.run_id:
            self.fs.delete_file(self.path)

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds):
            self._beat()

    def _beat(self) -> None:
        lease = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
            "seconds": self.seconds,
        }
        # Staged beside the lease (a hidden name) and moved over it: never half a lease. Not in the
        # sink's staging folder, which a run clears while this thread may be writing.
        put(self.fs, self.path, json.dumps(lease).encode(), self.root)
