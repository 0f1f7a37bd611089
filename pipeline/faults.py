"""One bad row is one error value: a failed encoder batch is bisected down to its failing rows.

An exception from the model fails only the rows that fail on their own: the batch is split in
halves until each failing row stands alone, and that row gets ``encode_failed: <message>``;
every other row gets its vector. A CUDA out-of-memory error first halves the token budget and
retries (down to ``MIN_TOKENS``), then bisects.

The prepare stage (decode, tokenize, resample in CPU tasks) is guarded the same way: a row whose
preparation raises an exception the family did not turn into an error value itself (a Pillow
crash on a malformed file, a storage error that is not transient) gets
``prepare_failed: <message>``. A transient storage error that outlasted its retries is raised:
the job stops, and a re-run resumes.

A circuit breaker tells a bug from bad data and stops the job with the traceback rather than
writing 10⁹ ``encode_failed`` rows:
- every single row of a failed batch (of ``SAME_ERROR_ROWS`` or more) fails alone, with one
  exception type;
- or more than ``BREAKER_RATE`` of the first ``BREAKER_ROWS`` rows this actor encoded failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from encoders.core.retry import is_transient
from encoders.core.spec import EncodeResult, Prepared

log = logging.getLogger(__name__)

SAME_ERROR_ROWS = 4
BREAKER_ROWS = 1000
BREAKER_RATE = 0.05
BREAKER_MIN_FAILURES = 5
MIN_TOKENS = 256


class EncoderBug(RuntimeError):
    """Failures that bad data does not explain: the job stops."""


@dataclass
class RowGuard:
    """Per encoder actor: bisects failed batches and keeps the breaker's counts."""

    seen: int = 0
    failed: int = 0

    def encode(
        self, fn: Callable[[pa.Array, int], EncodeResult], values: pa.Array, max_tokens: int, dim: int
    ) -> tuple[EncodeResult, list[str | None]]:
        """``fn(values, max_tokens)`` for the whole batch, or bisected: the result (failed rows
        not valid; an extra that no row produced is left out) and per row an error or None."""
        self.last_error: BaseException | None = None
        segments = self._bisect(fn, values, max_tokens)
        errors = _check_not_all_alike(segments, len(values), self.last_error)
        first = self.seen < BREAKER_ROWS
        self.seen += len(values)
        self.failed += len(errors)
        if first and self.failed >= BREAKER_MIN_FAILURES and self.failed > BREAKER_RATE * min(self.seen, BREAKER_ROWS):
            raise EncoderBug(
                f"{self.failed} of the first {self.seen} rows failed to encode (more than {BREAKER_RATE:.0%}): a bug, "
                f"not bad data; last: {errors[-1] if errors else ''}"
            ) from self.last_error
        return _assemble(segments, len(values), dim)

    def _bisect(
        self, fn: Callable[[pa.Array, int], Any], values: pa.Array, max_tokens: int, code: str = "encode_failed"
    ) -> list[tuple[int, Any, list[str | None]]]:
        """(rows, result or None, per-row errors) per segment, in order."""
        try:
            return [(len(values), fn(values, max_tokens), [None] * len(values))]
        except Exception as exc:  # noqa: BLE001 - every failure is judged by the breaker, none is swallowed whole
            self.last_error = exc
            if is_transient(exc):
                raise  # retried already where it happened; the store, not the row, is the problem
            if _out_of_memory(exc) and max_tokens > MIN_TOKENS:
                _free_cuda_cache()
                log.warning("CUDA out of memory at a %d-token budget; retrying with %d", max_tokens, max_tokens // 2)
                return self._bisect(fn, values, max_tokens // 2, code)
            if len(values) == 1:
                message = f"{code}: {type(exc).__name__}: {_first_line(exc)}"[:300]
                log.warning("%s", message)
                return [(1, None, [message])]
        half = len(values) // 2
        return self._bisect(fn, values.slice(0, half), max_tokens, code) + self._bisect(
            fn, values.slice(half), max_tokens, code
        )


def prepare_rows(fn: Callable[[pa.Array], Prepared], values: pa.Array) -> Prepared:
    """``fn(values)``, a family's prepare, for the whole batch or bisected: a row whose
    preparation raises alone gets ``prepare_failed``; the breaker's one-type rule applies."""
    guard = RowGuard()
    guard.last_error = None
    segments = guard._bisect(lambda part, _: fn(part), values, 0, "prepare_failed")
    _check_not_all_alike(segments, len(values), guard.last_error)
    if len(segments) == 1 and segments[0][1] is not None:
        return segments[0][1]
    value_type = next((r.values.type for _, r, _ in segments if r is not None), None)
    if value_type is None:
        value_type = fn(values.slice(0, 0)).values.type  # every row failed: the type of no rows
    parts, errors = [], []
    for rows, result, segment_errors in segments:
        parts.append(result.values if result is not None else pa.nulls(rows, value_type))
        errors += result.errors if result is not None else segment_errors
    return Prepared(pa.concat_arrays(parts), errors)


def _check_not_all_alike(segments: list[tuple[int, Any, list[str | None]]], n: int, cause: Any) -> list[str]:
    """The failed rows' errors; raises ``EncoderBug`` when every row of a batch failed alone with
    one exception type."""
    errors = [e for _, result, segment_errors in segments if result is None for e in segment_errors if e]
    kinds = {e.split(":", 2)[1].strip() for e in errors}
    if len(errors) >= SAME_ERROR_ROWS and len(errors) == n and len(kinds) == 1:
        raise EncoderBug(
            f"all {len(errors)} rows of a batch failed alone with one exception type: a bug, not bad data ({errors[0]})"
        ) from cause
    return errors


def _assemble(
    segments: list[tuple[int, EncodeResult | None, list[str | None]]], n: int, dim: int
) -> tuple[EncodeResult, list[str | None]]:
    if len(segments) == 1 and segments[0][1] is not None:
        return segments[0][1], segments[0][2]  # the clean path: the batch as the model gave it
    vectors, valid = np.zeros((n, dim), np.float32), np.zeros(n, bool)
    extras: dict[str, np.ndarray] = {}
    errors: list[str | None] = []
    start = 0
    for rows, result, segment_errors in segments:
        errors += segment_errors
        if result is not None:
            vectors[start : start + rows] = result.vectors
            valid[start : start + rows] = result.valid
            for key, value in result.extras.items():
                value = np.asarray(value)
                if key not in extras:
                    extras[key] = np.zeros((n, *value.shape[1:]), value.dtype)
                extras[key][start : start + rows] = value
        start += rows
    return EncodeResult(vectors, valid, extras), errors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
