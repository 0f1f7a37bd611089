"""Reading the jobs' own inputs (interactions, transactions): a Parquet, JSONL or CSV file or
folder, or any URI, through the pipeline's own readers."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from jobs.entrypoint import JobError
from pipeline.config import ConfigError, SourceConfig


def read_table(path: str, flag: str, required: Sequence[str] = ()) -> pa.Table:
    """The whole table; ``required`` columns must be there (a one-line error names the flag)."""
    from pipeline.chunks import plan_chunks
    from pipeline.sources import read_chunk

    try:
        chunks = plan_chunks([SourceConfig(path=path, derive_ids=True, infer_types=True)])  # typed columns
        tables = [read_chunk(c).drop_columns(["id"]) for c in chunks]
    except ConfigError as exc:
        raise JobError(f"{flag}: {str(exc).split(': ', 1)[-1]}") from None
    table = pa.concat_tables(tables, promote_options="permissive")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise JobError(
            f"{flag}: column {missing[0]!r} is not in {path!r}; its columns: {', '.join(table.column_names)}"
        )
    return table
