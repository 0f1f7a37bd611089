"""Dynamic padding: group sequences by length so that a padded micro-batch stays within a
token budget and padding is near zero."""
from __future__ import annotations

from typing import Sequence


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` in micro-batches, longest first.

    Each batch's padded size (rows x longest length) is at most ``max_tokens``; a single
    sequence longer than the budget still gets a batch of its own. Callers scatter results
    back by index, so input order is restored.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        # Sorted descending, so the first row of a batch is its longest.
        longest = longest if current else lengths[index]
        full = (len(current) + 1) * longest > max_tokens or (max_rows is not None and len(current) >= max_rows)
        if current and full:
            batches.append(current)
            current, longest = [], lengths[index]
        current.append(index)
    if current:
        batches.append(current)
    return batches
