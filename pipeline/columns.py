"""Output column names and the Arrow vector type, per DESIGN.md's contract."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from encoders.spec import EncoderSpec


def _base(spec: EncoderSpec, modality: str) -> str:
    # A multi-input model (CLIP, CLAP) puts the modality into the name.
    return f"{spec.output}_{modality}" if len(spec.columns) > 1 else spec.output


def embedding_column(spec: EncoderSpec, modality: str) -> str:
    return f"{_base(spec, modality)}_embedding"


def error_column(spec: EncoderSpec, modality: str) -> str:
    return f"{_base(spec, modality)}_error"


def patches_column(spec: EncoderSpec, modality: str) -> str | None:
    """``<output>_patches`` when the encoder pools to a patch grid (N*D values per row)."""
    return f"{_base(spec, modality)}_patches" if spec.options.get("pooling") == "patches" else None


def windows_column(spec: EncoderSpec, modality: str) -> str | None:
    """``<output>_windows`` for audio: how many windows were pooled into each clip's vector."""
    return f"{_base(spec, modality)}_windows" if modality == "audio" else None


def extra_columns(spec: EncoderSpec, modality: str, dtype: str = "float32") -> list[tuple[str, str, pa.DataType]]:
    """The columns an encoder adds beside ``_embedding``/``_error``: (key in the encoder's extras
    dict, column name, Arrow type). Encoders return ``(vectors, valid, {key: array})``."""
    extras = []
    patches = patches_column(spec, modality)
    if patches:  # (n, N*D): the patch grid, row-major; the grid shape is in the metadata
        extras.append(("patches", patches, vector_type(0, "list", dtype)))
    windows = windows_column(spec, modality)
    if windows:  # (n,) int: null where the clip had no vector
        extras.append(("windows", windows, pa.int32()))
    return extras


def extra_to_arrow(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """An encoder's extra output -> Arrow, null where the row has no vector."""
    if values.ndim == 2:
        return vectors_to_arrow(values, valid)
    return pa.array(np.asarray(values, dtype=np.int32), mask=~valid)


def prepared_column(spec: EncoderSpec, modality: str) -> str:
    """Internal: what prepare hands to encode; dropped by the encode stage."""
    return f"__omniembed_{_base(spec, modality)}_prepared"


def output_columns(spec: EncoderSpec) -> list[str]:
    return [name for m in spec.columns for name in (embedding_column(spec, m), error_column(spec, m))]


def vector_type(dim: int, vector_type: str = "list", dtype: str = "float32") -> pa.DataType:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.list_(value, dim) if vector_type == "fixed_size_list" else pa.list_(value)


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(n, d) float32 and an (n,) validity mask -> nullable list<float32>, d values per entry."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    fixed = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))
    return fixed.cast(pa.list_(pa.float32()))
