"""Output column names and Arrow types, per DESIGN.md's contract."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from encoders import FAMILIES
from encoders.core.spec import EncoderSpec, ExtraColumn


def _base(spec: EncoderSpec, modality: str) -> str:
    # A multi-input model (CLIP, CLAP) puts the modality into the name.
    return f"{spec.output}_{modality}" if len(spec.columns) > 1 else spec.output


def embedding_column(spec: EncoderSpec, modality: str) -> str:
    return f"{_base(spec, modality)}_embedding"


def error_column(spec: EncoderSpec, modality: str) -> str:
    return f"{_base(spec, modality)}_error"


def extra_columns(spec: EncoderSpec, modality: str, dtype: str = "float32") -> list[tuple[str, str, pa.DataType]]:
    """The columns the family declares beside ``_embedding``/``_error`` for this spec (patch grids,
    audio window counts): (key in ``EncodeResult.extras``, column name, Arrow type in the
    output's ``dtype``)."""
    declared: tuple[ExtraColumn, ...] = FAMILIES.get(spec.family).extra_columns(spec, modality)
    return [
        (extra.name, f"{_base(spec, modality)}_{extra.name}", _in_dtype(extra.arrow_type, dtype)) for extra in declared
    ]


def _in_dtype(arrow_type: pa.DataType, dtype: str) -> pa.DataType:
    """Float rows follow the output's vector dtype; other types stay as declared."""
    if pa.types.is_list(arrow_type) and pa.types.is_floating(arrow_type.value_type):
        return vector_type(0, "list", dtype)
    return arrow_type


def extra_to_arrow(values: np.ndarray, valid: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """An encoder's extra output -> Arrow, null where the row has no vector."""
    if values.ndim == 2:
        return vectors_to_arrow(values, valid)
    return pa.array(np.asarray(values), mask=~valid).cast(arrow_type)


def prepared_column(spec: EncoderSpec, modality: str) -> str:
    """Internal: what prepare hands to encode; dropped by the encode stage."""
    return f"__omniembed_{_base(spec, modality)}_prepared"


def vector_type(dim: int, vector_type: str = "list", dtype: str = "float32") -> pa.DataType:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.list_(value, dim) if vector_type == "fixed_size_list" else pa.list_(value)


def vectors_to_arrow(vectors: np.ndarray, valid: np.ndarray) -> pa.Array:
    """(n, d) float32 and an (n,) validity mask -> nullable list<float32>, d values per entry."""
    n, dim = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    fixed = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))
    return fixed.cast(pa.list_(pa.float32()))
