"""Prepared images on the encoder's side: uint8 CHW bytes -> one tensor, normalized on the device."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import torch

from encoders.core.spec import EncodeResult, ExtraColumn
from encoders.image.prepare import ImagePreprocess

# ``pooling: patches``: the (grid_h * grid_w, d) patch tokens, row-major, as N*D values per row.
PATCHES = ExtraColumn("patches", pa.list_(pa.float32()))
# (m, 3, crop, crop) uint8 -> ((m, d) pooled, (m, patches, d) patch tokens or None), float32 on CPU
ImageForward = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


def patch_columns(options: Mapping[str, Any]) -> tuple[ExtraColumn, ...]:
    return (PATCHES,) if options.get("pooling") == "patches" else ()


def encode_images(
    values: pa.Array, crop: int, micro_batch: int, forward: ImageForward, dim: int, patches: int
) -> EncodeResult:
    """Prepared images -> vectors (and the patch grids when ``patches`` > 0), ``micro_batch``
    images per forward."""
    images, valid = images_to_tensor(values, crop)
    out = np.zeros((len(valid), dim), dtype=np.float32)
    results = [forward(images[s : s + micro_batch]) for s in range(0, images.shape[0], micro_batch)]
    if results:
        out[valid] = torch.cat([pooled for pooled, _ in results]).numpy()
    if not patches:
        return EncodeResult(out, valid)
    grids = np.zeros((len(valid), patches * dim), dtype=np.float32)
    if results:
        grids[valid] = torch.cat([grid for _, grid in results]).reshape(int(valid.sum()), -1).numpy()
    return EncodeResult(out, valid, {PATCHES.name: grids})


def images_to_tensor(values: pa.Array, crop: int) -> tuple[torch.Tensor, np.ndarray]:
    """Prepared bytes -> ((m, 3, crop, crop) uint8 of the non-null rows, (n,) valid mask)."""
    rows = values.to_pylist()
    valid = np.array([r is not None for r in rows], dtype=bool)
    kept = [r for r in rows if r is not None]
    if not kept:
        return torch.empty((0, 3, crop, crop), dtype=torch.uint8), valid
    flat = np.frombuffer(b"".join(kept), dtype=np.uint8)
    return torch.from_numpy(flat.copy()).view(len(kept), 3, crop, crop), valid


def to_model_input(
    images: torch.Tensor, prep: ImagePreprocess, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """(n, 3, h, w) uint8 on CPU -> normalized float32 on ``device`` (the cast happens there).
    The layout changes on the uint8 tensor (a quarter of the bytes), and the float one is
    allocated once and normalized in place: the same values as ``(x / 255 - mean) / std``."""
    x = images.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1)
    return x.float().div_(255.0).sub_(mean).div_(std)
