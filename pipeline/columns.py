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
