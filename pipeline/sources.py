"""Reading: one read chunk -> its rows, with an ``id`` string column first.

Chunks are planned in pipeline/chunks.py (a Parquet row-group range, a JSONL or CSV file, a
group of files in a folder). Every row has a stable position in its chunk: derived ids are
``<relative path>:<row>``, ``keep-first`` drops later duplicates by position, and the read
task tags each row with its chunk's key, which the write stage counts and drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from encoders.core.retry import configure as configure_retries
from encoders.core.retry import is_transient, retrying
from pipeline.config import ConfigError
from pipeline.filesystems import join, open_filesystem
from pipeline.webdataset import BREAK, read_range

FORMAT_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "webdataset": (".tar",),
}
# Folder sources: file suffixes and the column that holds each file's content or path.
FOLDER_KINDS = {
    "text": ((".txt", ".md", ".text"), "text"),
    # The path or URI, not the bytes: the id pre-pass stays cheap, and prepare reads each file.
    "image": ((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"), "image"),
    "audio": ((".wav", ".flac", ".ogg", ".mp3"), "audio"),
}
REFERENCE_KINDS = ("image", "audio")  # folder kinds whose column holds a path/URI instead of the content
CHUNK_COLUMN = "_omniembed_chunk"  # the read chunk's key, carried to the write stage and dropped there


@dataclass(frozen=True)
class ReadChunk:
    """One row of the chunk table (pipeline/chunks.py): what a task needs to read a chunk."""

    key: str
    source: int
    root: str  # the source's path or URI, to reopen the filesystem in a task
    format: str  # parquet | jsonl | csv | folder
    kind: str = "table"
    id_column: str | None = None
    path: str = ""
    relpath: str = ""
    row_groups: tuple[int, ...] = ()
    first_row: int = 0
    rows: int = 0
    bytes: int = 0  # the rows' uncompressed size as read (0 for a folder group: its rows are paths)
    start_byte: int = 0  # a WebDataset range: its first sample's first header ...
    end_byte: int = 0  # ... and where its last sample ends
    files: tuple[str, ...] = ()  # a folder group's relative paths
    infer_types: bool = False  # CSV: infer column types (the id column stays text)
    id_prefix: str = ""  # derived ids: the source's path from the common root of colliding sources
    counted: bool = True  # False: a whole shard whose rows the read counts (``rows``: an estimate)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "ReadChunk":
        names = cls.__dataclass_fields__
        values = {k: v for k, v in row.items() if k in names}
        values["row_groups"] = tuple(values.get("row_groups") or ())
        values["files"] = tuple(values.get("files") or ())
        return cls(**values)


def read_chunk(chunk: ReadChunk, columns: list[str] | None = None) -> pa.Table:
    """The chunk's rows with an ``id`` string column first. ``columns`` limits what is read
    (the id is always read). A transient storage error is retried (encoders/core/retry.py); a
    file that can no longer be read as planned (deleted, truncated, corrupt) stops the run in
    one line that names it: its rows have no ids to give error values to, and a re-run resumes."""
    try:
        return retrying(_read_chunk, chunk, columns)
    except (pa.ArrowInvalid, OSError) as exc:
        if is_transient(exc):
            raise
        where = chunk.relpath if chunk.format != "folder" else f"{chunk.relpath} (a group of {chunk.rows} files)"
        raise ConfigError(
            f"sources[{chunk.source}]: cannot read {where!r} as planned ({str(exc).splitlines()[0][:200]}); it changed "
            "or is damaged: restore or remove it, then run again to resume"
        ) from None


def _read_chunk(chunk: ReadChunk, columns: list[str] | None) -> pa.Table:
    fs, _ = open_filesystem(chunk.root)
    if chunk.format == "folder":
        return _read_folder_chunk(fs, chunk, columns)
    wanted = None if columns is None else list(dict.fromkeys(([chunk.id_column] if chunk.id_column else []) + columns))
    if chunk.format == "webdataset":
        return read_range(fs, chunk.path, chunk.start_byte, chunk.end_byte, columns, tolerant=not chunk.counted)
    if chunk.format == "parquet":
        with fs.open_input_file(chunk.path) as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(chunk.row_groups), columns=_present(handle, wanted))
    else:
        table = read_table_file(fs, chunk)
        if wanted is not None:
            table = table.select([c for c in wanted if c in table.column_names])
    return _with_ids(table, chunk)


def read_table_file(fs: pafs.FileSystem, chunk: "ReadChunk") -> pa.Table:
    """A chunk's whole JSONL or CSV file (TSV by its suffix); gzip is detected. CSV columns are
    read as text, as written (``00123`` stays ``00123``), unless the source sets
    ``infer_types``; the id column is always text."""
    path, fmt = chunk.path, chunk.format
    try:
        with fs.open_input_stream(path, compression="detect") as stream:
            if fmt == "jsonl":
                return pajson.read_json(stream)
            data = stream.read()
        parse = pacsv.ParseOptions(delimiter="\t" if path.endswith(".tsv") else ",")
        if chunk.infer_types:
            names = [chunk.id_column] if chunk.id_column else []
        else:
            names = pacsv.open_csv(pa.BufferReader(data), parse_options=parse).schema.names
        types = pacsv.ConvertOptions(column_types={name: pa.string() for name in names})
        return pacsv.read_csv(pa.BufferReader(data), parse_options=parse, convert_options=types)
    except pa.ArrowInvalid as exc:
        # e.g. a JSON field that is a string in one row and a number in another: Arrow
        # columns have one type. Say where, rather than guess a type for the user.
        raise ConfigError(
            f"sources[{chunk.source}]: cannot read {chunk.relpath!r} as {fmt}: {str(exc).splitlines()[0]}"
        ) from None


def _present(handle: Any, wanted: list[str] | None) -> list[str] | None:
    if wanted is None:
        return None
    names = set(pq.ParquetFile(handle).schema_arrow.names)
    return [c for c in wanted if c in names]


def _with_ids(table: pa.Table, chunk: ReadChunk) -> pa.Table:
    if chunk.id_column is None:
        first = chunk.first_row
        ids = pa.array([f"{chunk.id_prefix}{chunk.relpath}:{first + i}" for i in range(table.num_rows)], pa.string())
        return table.add_column(0, "id", ids)
    if chunk.id_column not in table.column_names:
        raise ConfigError(
            f"sources[{chunk.source}].id_column: {chunk.id_column!r} is not a column of {chunk.relpath!r}; columns: "
            f"{', '.join(table.column_names)}"
        )
    column = table.column(chunk.id_column)
    try:
        ids = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ids = pa.chunked_array([pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())])
    if ids.null_count:
        row = pc.index(pc.is_null(ids), True).as_py() + chunk.first_row
        raise ConfigError(
            f"sources[{chunk.source}].id_column: {chunk.id_column!r} is null in {chunk.relpath!r} row {row}; ids must "
            "be present"
        )
    table = table.drop_columns([chunk.id_column])
    if "id" in table.column_names:
        table = table.drop_columns(["id"])
    return table.add_column(0, "id", ids)


def _read_folder_chunk(fs: pafs.FileSystem, chunk: ReadChunk, columns: list[str] | None) -> pa.Table:
    _, column = FOLDER_KINDS[chunk.kind]
    ids = pa.array([chunk.id_prefix + rel for rel in chunk.files], pa.string())
    if columns is not None and column not in columns:
        return pa.table({"id": ids})
    _, root = open_filesystem(chunk.root)
    if chunk.kind in REFERENCE_KINDS:
        base = chunk.root if "://" in chunk.root else root
        return pa.table({"id": ids, column: pa.array([join(base, rel) for rel in chunk.files], pa.string())})
    contents = []
    for rel in chunk.files:
        with fs.open_input_stream(join(root, rel)) as stream:
            contents.append(stream.read())
    # Bytes, not str: invalid UTF-8 must reach the text stage to become a decode_failed error.
    return pa.table({"id": ids, column: pa.array(contents, pa.binary())})


def read_chunk_rows(
    batch: pa.Table,
    chunks: pa.Table,
    schema: pa.Schema,
    output: str,
    retried_io_errors: list[str] | None = None,
    partners: pa.Table | None = None,
) -> pa.Table:
    """``map_batches`` body: chunk ordinals in, the chunks' rows out, conformed to ``schema``,
    tagged with their chunk's key. A chunk's ``drops`` (later duplicates) are left out, and
    so are ids already committed in its ``against`` parts (a partly done or re-planned chunk)."""
    configure_retries(retried_io_errors)
    tables = []
    for ordinal in batch.column("id").to_pylist():
        row = chunks.slice(ordinal, 1).to_pylist()[0]
        chunk = ReadChunk.from_row(row)
        table = read_chunk(chunk)
        tag = chunk.key if chunk.counted else counted_tag(chunk.key, table)
        if row.get("partner_rows"):  # sources joined by id: the columns of the rows joined to these
            from pipeline.joins import with_partners

            table = with_partners(table, row["partner_rows"], row["partner_pos"], partners)
        table = drop_rows(table, row.get("drops"))
        if row.get("against"):
            table = table.filter(pc.invert(pc.is_in(table["id"], value_set=committed_ids(output, row["against"]))))
        table = conform(table, schema)
        tables.append(table.append_column(CHUNK_COLUMN, pa.array([tag] * table.num_rows, pa.string())))
    if not tables:
        return schema.append(pa.field(CHUNK_COLUMN, pa.string())).empty_table()
    return pa.concat_tables(tables)


def counted_tag(key: str, table: pa.Table) -> str:
    """The chunk column's value for a chunk counted by its read: ``<key> <rows>[ <break line>]``,
    every row alike, so that whichever part commits a row records the count (and the break)."""
    warning = (table.schema.metadata or {}).get(BREAK)
    return f"{key} {table.num_rows}" + (f" {warning.decode()}" if warning else "")


def parse_tags(counts: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """Rows per chunk column value -> rows per chunk key, the counts read, the breaks found."""
    chunks: dict[str, int] = {}
    totals: dict[str, int] = {}
    breaks: dict[str, str] = {}
    for tag, rows in counts.items():
        key, _, rest = tag.partition(" ")
        chunks[key] = chunks.get(key, 0) + rows
        if rest:
            total, _, warning = rest.partition(" ")
            totals[key] = int(total)
            if warning:
                breaks[key] = warning
    return chunks, totals, breaks


def drop_rows(table: Any, rows: list[int] | None) -> Any:
    """A table or array less the rows at some positions (a chunk's later duplicates)."""
    if not rows:
        return table
    positions = pa.array(range(len(table)), pa.int32())
    return table.filter(pc.invert(pc.is_in(positions, value_set=pa.array(rows, pa.int32()))))


def committed_ids(output: str, parts: list[str]) -> pa.Array:
    """The ids of some committed part files of an output folder."""
    fs, root = open_filesystem(output)
    from pipeline.lance_sink import committed_lance_ids, is_lance

    if is_lance(fs, root):
        return committed_lance_ids(output, parts)
    ids = [retrying(pq.read_table, join(root, name), columns=["id"], filesystem=fs).column("id") for name in parts]
    return pa.chunked_array([c for column in ids for c in column.chunks], pa.string()).combine_chunks()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Reorder, cast and fill missing columns (null) to match ``schema``."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            column = table.column(f.name)
            columns.append(column if column.type == f.type else pc.cast(column, f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)
