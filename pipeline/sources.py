"""Sources -> read chunks -> one Ray Dataset with an ``id`` column, the modality columns and
the passthrough columns.

Reads are planned as deterministic chunks (a Parquet row-group range, a JSONL or CSV file, a
group of files in a folder) so that every row has a stable position: derived ids are
``<relative path>:<row>``, ``keep-first`` means first by source, file and row, and resume can
skip committed ids. A pre-pass reads only the ids to find duplicates and count rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.config import ConfigError, SourceConfig
from pipeline.filesystems import list_files, open_filesystem

FORMAT_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz"),
    "csv": (".csv", ".csv.gz", ".tsv"),
}
# Folder sources: file suffixes and the column that holds each file's content or path.
FOLDER_KINDS = {
    "text": ((".txt", ".md", ".text"), "text"),
    # The path or URI, not the bytes: the id pre-pass stays cheap, and prepare reads each file.
    "image": ((".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"), "image"),
    "audio": ((".wav", ".flac", ".ogg", ".mp3"), "audio"),
}
REFERENCE_KINDS = ("image", "audio")  # folder kinds whose column holds a path/URI instead of the content
ROWS_PER_PARQUET_CHUNK = 65_536
FILES_PER_CHUNK = 256


@dataclass(frozen=True)
class ReadChunk:
    index: int  # position in the global read order
    source: int
    root: str  # the source's path or URI, to reopen the filesystem in a task
    format: str  # parquet | jsonl | csv | folder
    path: str = ""
    relpath: str = ""
    row_groups: tuple[int, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    id_column: str | None = None
    kind: str = "table"


@dataclass
class SourcePlan:
    chunks: list[ReadChunk]
    schema: pa.Schema  # the unified output schema of the read stage: id first
    total_rows: int
    skipped_rows: int = 0
    duplicates: int = 0
    drops: dict[int, list[int]] = field(default_factory=dict)  # chunk index -> local rows to drop


def plan_chunks(sources: Iterable[SourceConfig]) -> list[ReadChunk]:
    chunks: list[ReadChunk] = []
    for s_index, source in enumerate(sources):
        where = f"sources[{s_index}]"
        fs, root = open_filesystem(source.path)
        entry = fs.get_file_info(root)
        if entry.type == pafs.FileType.NotFound:
            raise ConfigError(f"{where}.path: {source.path!r} does not exist")
        if source.kind != "table":
            if source.kind not in FOLDER_KINDS:
                raise ConfigError(f"{where}.kind: {source.kind!r} sources are not supported yet")
            if entry.type != pafs.FileType.Directory:
                raise ConfigError(f"{where}.path: a {source.kind} source must be a folder, got a file {source.path!r}")
            files = list_files(fs, root, FOLDER_KINDS[source.kind][0])
            if not files:
                raise ConfigError(
                    f"{where}.path: no {source.kind} files ({', '.join(FOLDER_KINDS[source.kind][0])}) in "
                    f"{source.path!r}"
                )
            for start in range(0, len(files), FILES_PER_CHUNK):
                chunks.append(
                    ReadChunk(
                        len(chunks),
                        s_index,
                        source.path,
                        "folder",
                        files=tuple(files[start : start + FILES_PER_CHUNK]),
                        kind=source.kind,
                    )
                )
            continue
        if source.id_column is None and not source.derive_ids:
            raise ConfigError(f"{where}: id_column is required (or set derive_ids: true for ids '<file>:<row>')")
        if entry.type == pafs.FileType.Directory:
            fmt = source.format or _folder_format(fs, root, where)
            files = list_files(fs, root, FORMAT_SUFFIXES[fmt])
            if not files:
                raise ConfigError(f"{where}.path: no {fmt} files in {source.path!r}")
        else:
            fmt = source.format or _format_of(root, where)
            files = [(root, root.rstrip("/").rpartition("/")[2])]
        for path, rel in files:
            if fmt != "parquet":
                chunks.append(ReadChunk(len(chunks), s_index, source.path, fmt, path, rel, id_column=source.id_column))
                continue
            for groups in _row_group_ranges(fs, path, where):
                chunks.append(
                    ReadChunk(len(chunks), s_index, source.path, fmt, path, rel, groups, id_column=source.id_column)
                )
    return chunks


def _format_of(path: str, where: str) -> str:
    lower = path.lower()
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if lower.endswith(suffixes):
            return fmt
    raise ConfigError(
        f"{where}.format: cannot tell the format of {path!r}; set format: to one of {', '.join(FORMAT_SUFFIXES)}"
    )


def _folder_format(fs: pafs.FileSystem, root: str, where: str) -> str:
    found = [fmt for fmt, suffixes in FORMAT_SUFFIXES.items() if list_files(fs, root, suffixes)]
    if len(found) != 1:
        raise ConfigError(
            f"{where}.format: folder holds {' and '.join(found) or 'no table'} files; set format: to one of "
            f"{', '.join(FORMAT_SUFFIXES)}"
        )
    return found[0]


def _row_group_ranges(fs: pafs.FileSystem, path: str, where: str) -> list[tuple[int, ...]]:
    try:
        with fs.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{where}: {path!r} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    ranges, current, rows = [], [], 0
    for group in range(meta.num_row_groups):
        current.append(group)
        rows += meta.row_group(group).num_rows
        if rows >= ROWS_PER_PARQUET_CHUNK:
            ranges.append(tuple(current))
            current, rows = [], 0
    if current or not ranges:
        ranges.append(tuple(current))
    return ranges


def read_chunk(chunk: ReadChunk, columns: list[str] | None = None) -> pa.Table:
    """The chunk's rows with an ``id`` string column first. ``columns`` limits what is read
    (the id is always read)."""
    fs, _ = open_filesystem(chunk.root)
    if chunk.format == "folder":
        return _read_folder_chunk(fs, chunk, columns)
    wanted = None if columns is None else list(dict.fromkeys(([chunk.id_column] if chunk.id_column else []) + columns))
    if chunk.format == "parquet":
        with fs.open_input_file(chunk.path) as handle:
            table = pq.ParquetFile(handle).read_row_groups(list(chunk.row_groups), columns=_present(handle, wanted))
    else:
        try:
            with fs.open_input_stream(chunk.path, compression="detect") as stream:
                table = (
                    pajson.read_json(stream)
                    if chunk.format == "jsonl"
                    else pacsv.read_csv(
                        stream, parse_options=pacsv.ParseOptions(delimiter="\t" if chunk.path.endswith(".tsv") else ",")
                    )
                )
        except pa.ArrowInvalid as exc:
            # e.g. a JSON field that is a string in one row and a number in another: Arrow
            # columns have one type. Say where, rather than guess a type for the user.
            raise ConfigError(
                f"sources[{chunk.source}]: cannot read {chunk.relpath!r} as {chunk.format}: {str(exc).splitlines()[0]}"
            ) from None
        if wanted is not None:
            table = table.select([c for c in wanted if c in table.column_names])
    return _with_ids(table, chunk)


def _present(handle: Any, wanted: list[str] | None) -> list[str] | None:
    if wanted is None:
        return None
    names = set(pq.ParquetFile(handle).schema_arrow.names)
    return [c for c in wanted if c in names]


def _with_ids(table: pa.Table, chunk: ReadChunk) -> pa.Table:
    if chunk.id_column is None:
        first = _first_row(chunk)
        ids = pa.array([f"{chunk.relpath}:{first + i}" for i in range(table.num_rows)], pa.string())
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
        row = pc.index(pc.is_null(ids), True).as_py() + _first_row(chunk)
        raise ConfigError(
            f"sources[{chunk.source}].id_column: {chunk.id_column!r} is null in {chunk.relpath!r} row {row}; ids must "
            "be present"
        )
    table = table.drop_columns([chunk.id_column])
    if "id" in table.column_names:
        table = table.drop_columns(["id"])
    return table.add_column(0, "id", ids)


def _first_row(chunk: ReadChunk) -> int:
    if chunk.format != "parquet" or not chunk.row_groups or chunk.row_groups[0] == 0:
        return 0
    fs, _ = open_filesystem(chunk.root)
    with fs.open_input_file(chunk.path) as handle:
        meta = pq.ParquetFile(handle).metadata
    return sum(meta.row_group(g).num_rows for g in range(chunk.row_groups[0]))


def _read_folder_chunk(fs: pafs.FileSystem, chunk: ReadChunk, columns: list[str] | None) -> pa.Table:
    _, column = FOLDER_KINDS[chunk.kind]
    ids = pa.array([rel for _, rel in chunk.files], pa.string())
    if columns is not None and column not in columns:
        return pa.table({"id": ids})
    if chunk.kind in REFERENCE_KINDS:
        remote = "://" in chunk.root
        refs = [f"{chunk.root.rstrip('/')}/{rel}" if remote else path for path, rel in chunk.files]
        return pa.table({"id": ids, column: pa.array(refs, pa.string())})
    contents = []
    for path, _ in chunk.files:
        with fs.open_input_stream(path) as stream:
            contents.append(stream.read())
    # Bytes, not str: invalid UTF-8 must reach the text stage to become a decode_failed error.
    return pa.table({"id": ids, column: pa.array(contents, pa.binary())})


def needs_reading(chunk: ReadChunk) -> bool:
    """Whether the id pre-pass must open the chunk's file (a folder's ids are its listing)."""
    return chunk.format != "folder"


def prepass(
    chunks: list[ReadChunk],
    committed_ids: pa.Array | None,
    on_duplicate_id: str,
    run_tasks: Callable[[Callable[[ReadChunk], Any], list[ReadChunk]], list[Any]],
) -> SourcePlan:
    """Read the ids (and schemas) of every chunk: count rows, find duplicates, skip committed
    ids. ``run_tasks`` maps a function over chunks (Ray tasks in a run, a loop in tests)."""
    results = run_tasks(_ids_and_schema, chunks)
    schemas = [schema for _, schema in results]
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConfigError(f"sources: columns disagree in type across files ({str(exc).splitlines()[0]})") from None
    ids = pa.chunked_array([r[0] for r in results], pa.string())
    chunk_of = pa.chunked_array([pa.array([i] * len(r[0]), pa.int64()) for i, r in enumerate(results)], pa.int64())
    local = pa.chunked_array([pa.array(range(len(r[0])), pa.int64()) for r in results], pa.int64())
    table = pa.table({"id": ids, "chunk": chunk_of, "row": local, "pos": pc.add(pc.multiply(chunk_of, 1 << 32), local)})
    counts = table.group_by("id").aggregate([("pos", "min"), ("pos", "count")])
    duplicated = counts.filter(pc.greater(counts["pos_count"], 1))
    duplicates = int(pc.sum(duplicated["pos_count"]).as_py() or 0) - duplicated.num_rows
    if duplicated.num_rows and on_duplicate_id == "error":
        sample = ", ".join(repr(i) for i in duplicated["id"].to_pylist()[:3])
        raise ConfigError(
            f"sources: {duplicated.num_rows} ids occur more than once (e.g. {sample}); "
            "fix the input or set output.on_duplicate_id: keep-first"
        )
    drop_mask = pc.invert(pc.is_in(table["pos"], value_set=counts["pos_min"]))  # later duplicates
    skipped = 0
    if committed_ids is not None and len(committed_ids):
        committed = pc.is_in(table["id"], value_set=committed_ids)
        skipped = int(pc.sum(pc.and_(committed, pc.invert(drop_mask))).as_py() or 0)
        drop_mask = pc.or_(drop_mask, committed)
    dropped = table.filter(drop_mask)
    drops: dict[int, list[int]] = {}
    for c, r in zip(dropped["chunk"].to_pylist(), dropped["row"].to_pylist()):
        drops.setdefault(c, []).append(r)
    total = table.num_rows - duplicates
    return SourcePlan(chunks, schema, total, skipped, duplicates, drops)


def _ids_and_schema(chunk: ReadChunk) -> tuple[pa.Array, pa.Schema]:
    """Only the ids are read; the schema comes from metadata (Parquet), the folder kind, or
    the parsed file."""
    if chunk.format == "folder":  # ids are the listing: nothing to open
        _, column = FOLDER_KINDS[chunk.kind]
        content = pa.string() if chunk.kind in REFERENCE_KINDS else pa.binary()
        return read_chunk(chunk, columns=[]).column("id").combine_chunks(), pa.schema(
            [("id", pa.string()), (column, content)]
        )
    if chunk.format == "parquet":
        fs, _ = open_filesystem(chunk.root)
        with fs.open_input_file(chunk.path) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
        table = read_chunk(chunk, columns=[])
        names = [n for n in schema.names if n not in ("id", chunk.id_column)]
        schema = pa.schema([pa.field("id", pa.string())] + [schema.field(n) for n in names])
    else:
        table = read_chunk(chunk)
        schema = table.schema
    return table.column("id").combine_chunks(), schema


def chunk_row(chunk: ReadChunk, drops: list[int]) -> dict[str, str]:
    return {"chunk": json.dumps({**asdict(chunk), "drops": drops})}


def read_chunk_rows(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """``map_batches`` body: one serialized chunk in, its rows out, conformed to ``schema``."""
    tables = []
    for item in batch.column("chunk").to_pylist():
        data = json.loads(item)
        drops = data.pop("drops")
        data["row_groups"] = tuple(data["row_groups"])
        data["files"] = tuple(tuple(f) for f in data["files"])
        table = read_chunk(ReadChunk(**data))
        if drops:
            keep = pc.invert(
                pc.is_in(pa.array(range(table.num_rows), pa.int64()), value_set=pa.array(drops, pa.int64()))
            )
            table = table.filter(keep)
        tables.append(conform(table, schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


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
