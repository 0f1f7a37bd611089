"""Dynamic padding: group sequences by length so that a padded micro-batch stays within a
token budget and padding is near zero."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def plan_micro_batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int | None = None, overhead_tokens: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` in micro-batches, longest first.

    Sequences are sorted by length, then cut where the total cost is least: each batch costs
    its padded size (rows x longest, at most ``max_tokens``) plus a fixed overhead per forward
    call (``overhead_tokens``, default ``max_tokens // 64``). A few more, tighter batches beat
    one batch full of padding. A sequence longer than the budget gets a batch of its own.
    Callers scatter results back by index, so input order is restored.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    n = len(lengths)
    if n == 0:
        return []
    overhead = max_tokens // 64 if overhead_tokens is None else overhead_tokens
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    ordered = np.asarray(lengths, dtype=np.int64)[order]
    # best[j]: least cost of the first j sorted sequences; cut[j]: where its last batch starts.
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for start in range(n):
        longest = max(int(ordered[start]), 1)
        rows = max(1, max_tokens // longest)
        if max_rows is not None:
            rows = min(rows, max_rows)
        rows = min(rows, n - start)
        # Sorted descending, so the first sequence of a batch is its longest.
        cost = best[start] + overhead + longest * np.arange(1, rows + 1)
        ends = slice(start + 1, start + rows + 1)
        better = cost < best[ends]
        best[ends] = np.where(better, cost, best[ends])
        cut[ends] = np.where(better, start, cut[ends])
    batches: list[list[int]] = []
    end = n
    while end > 0:
        start = int(cut[end])
        batches.append(order[start:end].tolist())
        end = start
    return batches[::-1]


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> right-padded (n, longest) ids and attention mask, int64 on CPU."""
    n, longest = len(sequences), max(len(s) for s in sequences)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask
