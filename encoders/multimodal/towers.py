"""What CLIP and CLAP share on the encoder's side: text-tower rows in micro-batches, and
projected features written into one space (L2-normalized when asked)."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import pyarrow as pa
import torch

from encoders.core.spec import EncodeResult

T = TypeVar("T")


def token_sequences(values: pa.Array) -> tuple[list[list[int]], np.ndarray]:
    """Prepared text (text towers truncate: one chunk per row) -> (the token ids of the non-null
    rows, (n,) valid mask)."""
    rows = values.to_pylist()
    valid = np.array([r is not None for r in rows], dtype=bool)
    return [r[0] for r in rows if r is not None], valid


def in_batches(items: Sequence[T], step: int) -> list[Sequence[T]]:
    return [items[s : s + step] for s in range(0, len(items), step)]


def shared_space(features: list[torch.Tensor], valid: np.ndarray, dim: int, normalize: bool) -> EncodeResult:
    """Projected (m_i, dim) features of the valid rows, in order -> the batch's vectors."""
    out = np.zeros((len(valid), dim), dtype=np.float32)
    if features:
        joined = torch.cat(features)
        out[valid] = (torch.nn.functional.normalize(joined, dim=1) if normalize else joined).numpy()
    return EncodeResult(out, valid)
