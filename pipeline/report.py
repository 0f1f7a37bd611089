"""What a run tells the person watching it: rows committed, rows/s and an ETA for the whole job,
one line every ``interval`` seconds (a single line updated in place on a terminal), instead of
Ray Data's per-operator blocks; and Ray's own log lines kept for ``-v``."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator, TextIO


class RowProgress:
    """Counts committed rows against the rows the run planned to embed."""

    def __init__(self, total: int, interval: float | None = None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 30.0)
        self.total, self.done = total, 0
        self.started = self.last = time.monotonic()

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now)

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done / elapsed
        share = f" ({self.done / self.total:.1%})" if self.total else ""
        left = self.total - self.done
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left > 0 else ""
        return f"omniembed: {self.done:,} of {self.total:,} rows{share}, {rate:,.1f} rows/s{eta}"

    def _emit(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now).ljust(79))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def quiet_ray(verbose: bool) -> None:
    """Before Ray and Ray Data are imported: without ``-v`` a run shows only its own lines and
    errors. Ray Data's INFO lines and progress blocks are kept for ``-v``; Ray's own (its start,
    its token-auth notice) are quieted by ``init_ray(quiet=True)``."""
    if verbose:
        return
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read when Ray Data configures its logging
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


# C++ log lines that Ray writes to the driver's own stderr and that say nothing to act on: every
# actor pool gets "has constructor arguments in the object store and max_restarts > 0" (Ray
# Data passes its map function through the object store; the actor may still restart).
NOISE = ("constructor arguments in the object store",)


@contextlib.contextmanager
def filtered_stderr(noise: tuple[str, ...] = NOISE) -> Iterator[None]:
    """File descriptor 2 through a pipe, with the lines that hold one of ``noise`` left out:
    Ray's C++ core worker writes to the descriptor, not to ``sys.stderr``. Everything else,
    Python's own stderr included, passes unchanged, line by line."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(n.encode() in line for n in noise):
                    os.write(original, line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the thread drains and stops
        thread.join(timeout=5)
        os.close(original)
