"""The output schema, decided and checked before anything is written: ``id``, the passthrough
columns, per encoder its vector and error columns, then the extra columns families declare; the
``omniembed`` metadata rides on it. Write tasks conform every part to it (pipeline/sink.py)."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pyarrow as pa

from encoders.core.spec import EncoderSpec
from pipeline.columns import embedding_column, error_column, extra_columns, vector_type
from pipeline.config import Config, ConfigError
from pipeline.sink import FORMAT_VERSION
from pipeline.sources import FOLDER_KINDS
from pipeline.webdataset import READ_ERRORS


def plan_output_schema(
    config: Config, specs: Sequence[EncoderSpec], read_schema: pa.Schema, encoders_meta: Mapping[str, Any]
) -> pa.Schema:
    """The schema of every part file, after checking that the encoders' input columns and the
    passthrough columns are source columns (a ``ConfigError`` naming the field otherwise)."""
    read_names = read_schema.names
    for i, spec in enumerate(specs):
        for column in spec.columns.values():
            if column not in read_names:
                raise ConfigError(
                    f"encoders[{i}].column: {column!r} is not a source column; columns: {', '.join(read_names)}"
                )
    keep = [n for n in read_names if n not in ("id", READ_ERRORS)]
    for source in config.sources:
        if source.passthrough is not None:
            missing = [c for c in source.passthrough if c not in read_names]
            if missing:
                raise ConfigError(f"sources: passthrough column {missing[0]!r} is not a source column")
    wanted = {c for s in config.sources if s.passthrough is not None for c in s.passthrough}
    if any(s.passthrough is not None for s in config.sources):
        keep = [n for n in keep if n in wanted]
    # A folder source's file contents stay in the files; its id is the file's path.
    contents = {FOLDER_KINDS[s.kind][1] for s in config.sources if s.kind in FOLDER_KINDS}
    # So do a WebDataset sample's media members (bytes); its text members are passed through.
    if READ_ERRORS in read_names:
        contents |= {n for n in keep if pa.types.is_binary(read_schema.field(n).type)}
    keep = [n for n in keep if n not in contents or n in wanted]
    fields = [pa.field("id", pa.string(), nullable=False)] + [read_schema.field(name) for name in keep]
    # Lance indexes fixed_size_list<float32, D>: vector_type and dtype apply to Parquet only.
    lance = config.output.format == "lance"
    kind, dtype = ("fixed_size_list", "float32") if lance else (config.output.vector_type, config.output.dtype)
    for spec in specs:
        vtype = vector_type(spec.dim, kind, dtype)
        for modality in spec.columns:
            fields += [
                pa.field(embedding_column(spec, modality), vtype),
                pa.field(error_column(spec, modality), pa.string()),
            ]
    for spec in specs:  # patch grids and audio window counts come last
        for modality in spec.columns:
            fields += [pa.field(column, arrow_type) for _, column, arrow_type in extra_columns(spec, modality, dtype)]
    metadata = {"version": FORMAT_VERSION, "encoders": dict(encoders_meta)}
    return pa.schema(fields, metadata={"omniembed": json.dumps(metadata, sort_keys=True)})
