"""Transient storage errors are retried with backoff; every other error is raised at once.

What counts as transient is a list of message patterns: Ray Data's
``DataContext.retried_io_errors`` (S3's SLOW_DOWN, HTTP 503, ...). The pipeline reads it from
Ray and passes it here (``configure``); this package imports no Ray. Each pattern is matched as
a substring, then as a regular expression, as Ray Data does.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Callable, Iterable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ray Data's defaults (ray.data.context.DEFAULT_RETRIED_IO_ERRORS), until the pipeline passes its own.
RETRIED_IO_ERRORS: tuple[str, ...] = (
    "AWS Error INTERNAL_FAILURE",
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SLOW_DOWN",
    "AWS Error UNKNOWN (HTTP status 503)",
    "AWS Error SERVICE_UNAVAILABLE",
)
ATTEMPTS = 6
FIRST_WAIT_SECONDS = 0.25
MAX_WAIT_SECONDS = 16.0


def configure(patterns: Iterable[str] | None) -> None:
    """Use these patterns in this process (a worker gets them with its stage's arguments)."""
    global RETRIED_IO_ERRORS
    if patterns is not None:
        RETRIED_IO_ERRORS = tuple(patterns)


def is_transient(exc: BaseException) -> bool:
    message = str(exc)
    for pattern in RETRIED_IO_ERRORS:
        if pattern in message:
            return True
        try:
            if re.search(pattern, message):
                return True
        except re.error:
            continue
    return False


def retrying(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)``, retried with jittered exponential backoff while it fails with a
    transient error, at most ``ATTEMPTS`` times."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:  # what storage clients raise; others are bugs
            if attempt == ATTEMPTS or not is_transient(exc):
                raise
            wait = min(MAX_WAIT_SECONDS, FIRST_WAIT_SECONDS * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("transient storage error (try %d of %d), again in %.1f s: %s", attempt, ATTEMPTS, wait, exc)
            time.sleep(wait)
    raise AssertionError("unreachable")
