"""Pooling of token states into one vector per sequence."""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "cls", "max", "last")


def check_pooling(mode: str) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling {mode!r} is not supported; valid modes: {', '.join(POOLING_MODES)}")
    return mode


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """(n, t, d) hidden states, (n, t) 0/1 mask, (n,) lengths -> (n, d), computed in float32.

    Sequences are right-padded, so the last real token of row i is at lengths[i] - 1.
    """
    hidden = hidden.float()
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (n, t, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(1)
    if mode == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    raise ValueError(f"pooling {mode!r} is not supported; valid modes: {', '.join(POOLING_MODES)}")
