"""Planning: sources -> read chunks, one Arrow row each, with file metadata read in tasks.

A read chunk is a Parquet row-group range, a JSONL or CSV file, or a group of files in a folder.
Its ``key`` is stable across runs: a hash of the source, the file's relative path, the row
range and the file's size and modification time (or ETag). It is never a position in a
listing, which shifts when a file is added. Folder groups are cut where a file's path hashes
to a boundary (content-defined, as rsync cuts blocks), so an added file changes only its own
group. Progress and resume count rows per key (pipeline/progress.py).

Each source is listed once, in a task. Parquet footers are read, and JSONL and CSV files
parsed for their row counts and schemas, in tasks over batches of files. The driver holds the
chunk table: one Arrow row per chunk, never a Python object per row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from encoders.core.retry import retrying
from pipeline.config import ConfigError, SourceConfig
from pipeline.filesystems import LISTING_SCHEMA, open_filesystem, with_suffix
from pipeline.source_paths import check_reached_once, element_listings, source_root
from pipeline.sources import FOLDER_KINDS, FORMAT_SUFFIXES, REFERENCE_KINDS, ReadChunk, read_table_file
from pipeline.tasks import LocalTasks, Tasks
from pipeline.webdataset import READ_ERRORS, ShardScan, scan_shard

log = logging.getLogger(__name__)

ROWS_PER_PARQUET_CHUNK = 65_536
CHUNK_BYTES = 256 * 2**20  # a Parquet chunk ends at this many uncompressed bytes (a row group at least)
FILES_PER_CHUNK = 256  # a folder group's mean size; a group is cut at 4x this at the latest
FILES_PER_PLANNING_TASK = 32
# Chunks up to this many rows are read and prepared in one task (pipeline/adapter.py
# read_remote_args): a folder group at its largest.
FUSED_CHUNK_ROWS = 4 * FILES_PER_CHUNK
LOCAL_PLANNING_FILES = 16  # fewer files are planned on the driver: no worker start for a small job

CHUNK_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.int32()),
        ("root", pa.string()),
        ("format", pa.string()),  # parquet | jsonl | csv | folder
        ("kind", pa.string()),  # table | text | image | audio
        ("id_column", pa.string()),
        ("path", pa.string()),
        ("relpath", pa.string()),
        ("row_groups", pa.list_(pa.int32())),
        ("first_row", pa.int64()),  # the chunk's first row in its file, for derived ids
        ("rows", pa.int64()),
        ("bytes", pa.int64()),  # uncompressed, as read: stage batches and parts are sized by it
        ("start_byte", pa.int64()),  # a WebDataset range of a shard
        ("end_byte", pa.int64()),
        ("files", pa.list_(pa.string())),  # a folder group's relative paths
        ("infer_types", pa.bool_()),
        ("id_prefix", pa.string()),
        ("counted", pa.bool_()),  # False: a whole shard whose rows the read counts (rows: an estimate)
    ]
)


@dataclass
class ChunkPlan:
    chunks: pa.Table  # CHUNK_SCHEMA, in read order: source, file, row
    schema: pa.Schema  # the read stage's unified schema: id first
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line per damaged shard


def plan_sources(sources: Sequence[SourceConfig], tasks: Tasks, count_on_read: bool = False) -> ChunkPlan:
    """``count_on_read``: no pass reads every id (``on_duplicate_id: trust``, no join), so a
    WebDataset shard's headers are read only as far as ``webdataset.HEAD_SAMPLES``."""
    # A local file is listed here; a folder or a URI in a task (a listing of 10^5 files is
    # 10^5 Python objects, which the driver should not hold).
    local = all("://" not in p and os.path.isfile(p) for s in sources for p in s.paths)
    listings = tasks.map(list_source, list(enumerate(sources)), local=local)
    jobs, folder_parts = [], []
    for (s_index, source), (fmt, files) in zip(enumerate(sources), listings):
        if fmt == "folder":  # the listing task already cut the folder into groups
            folder_parts.append(files)
            continue
        for start in range(0, files.num_rows, FILES_PER_PLANNING_TASK):
            jobs.append((s_index, source, fmt, files.slice(start, FILES_PER_PLANNING_TASK), count_on_read))
    n_files = sum(job[3].num_rows for job in jobs)
    described = tasks.map(describe_files, jobs, local=n_files <= LOCAL_PLANNING_FILES)
    by_source: dict[int, list[pa.Table]] = {}
    for (s_index, *_), (table, _, _) in zip(jobs, described):
        by_source.setdefault(s_index, []).append(table)
    for part in folder_parts:
        by_source.setdefault(part.column("source")[0].as_py(), []).append(part)
    ordered = [t for s in sorted(by_source) for t in by_source[s]]
    chunks = pa.concat_tables(ordered) if ordered else CHUNK_SCHEMA.empty_table()
    # Ids that are not derived from paths (sample keys), or that are meant to meet (a joined
    # source's) keep their form.
    keyed = {i for i, (fmt, _) in enumerate(listings) if fmt == "webdataset" or sources[i].join}
    chunks = _prefix_colliding_derived_ids(chunks, sources, keyed)
    per_source: dict[int, set[str]] = {}
    for (s_index, *_), (_, schema, _) in zip(jobs, described):
        per_source.setdefault(s_index, set()).update(schema.names)
    for i, source in enumerate(sources):
        if source.kind != "table":
            per_source.setdefault(i, set()).update(_folder_schema(source.kind).names)
    _check_join_columns(sources, per_source)
    schemas = [schema for _, schema, _ in described] + [_folder_schema(s.kind) for s in sources if s.kind != "table"]
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ConfigError(f"sources: columns disagree in type across files ({str(exc).splitlines()[0]})") from None
    warnings = [w for _, _, found in described for w in found]
    for warning in warnings:
        log.warning("%s", warning)
    return ChunkPlan(chunks.combine_chunks(), schema, warnings)


def _check_join_columns(sources: Sequence[SourceConfig], columns: dict[int, set[str]]) -> None:
    """A joined source adds its columns to the rows above: a name both sides have is a one-line
    error rather than a silent choice of one side."""
    above: set[str] = set()
    for i, source in enumerate(sources):
        own = columns.get(i, set()) - {"id", READ_ERRORS}
        if source.join:
            clash = sorted(own & above)
            if clash:
                raise ConfigError(
                    f"sources[{i}]: column {clash[0]!r} is also a column of a source above, which this source joins; "
                    "rename it in one of them"
                )
        above |= own


def _prefix_colliding_derived_ids(chunks: pa.Table, sources: Sequence[SourceConfig], keyed: set[int]) -> pa.Table:
    """Derived ids (``<file>:<row>``, a folder's relative paths) of two sources can collide:
    ``2023/part-0.parquet`` and ``2024/part-0.parquet`` both give ``part-0.parquet:0``. Only
    then does each derived-id source get its path from the common root of those sources
    (``2023/part-0.parquet:0``). Ids read from an id column are never rewritten."""
    derived = [i for i, s in enumerate(sources) if s.kind != "table" or (s.id_column is None and i not in keyed)]
    if len(derived) < 2:
        return chunks
    names: dict[int, set[str]] = {i: set() for i in derived}
    for source, relpath, files in zip(*(chunks.column(c).to_pylist() for c in ("source", "relpath", "files"))):
        if source in names:
            names[source].update(files or [relpath])
    if sum(len(n) for n in names.values()) == len(set().union(*names.values())):
        return chunks  # no two derived-id sources share a name: ids stay as they are
    files = set(zip(chunks.column("source").to_pylist(), chunks.column("path").to_pylist()))
    bases = {}
    for i in derived:  # a file source's folder, or the folder itself
        inner = open_filesystem(source_root(sources[i]))[1].rstrip("/")
        bases[i] = posixpath.dirname(inner) if (i, inner) in files else inner
    common = posixpath.commonpath(list(bases.values())) if len(set(bases.values())) > 1 else ""
    relative = {i: posixpath.relpath(bases[i], common) if common else "." for i in derived}
    prefixes = {i: "" if rel == "." else rel + "/" for i, rel in relative.items()}
    column = [prefixes.get(source, "") for source in chunks.column("source").to_pylist()]
    index = chunks.schema.get_field_index("id_prefix")
    return chunks.set_column(index, "id_prefix", pa.array(column, pa.string()))


def list_source(item: tuple[int, SourceConfig]) -> tuple[str, pa.Table]:
    """One listing per source: its format, and its files (path, relative path, version); for a
    folder source, its read chunks. A list path's elements are one source: one format, relative
    paths from their common folder, and no file reached twice."""
    s_index, source = item
    where = f"sources[{s_index}]"
    if source.kind != "table" and source.kind not in FOLDER_KINDS:
        raise ConfigError(f"{where}.kind: {source.kind!r} sources are not supported yet")
    fmt, parts = None, []
    for j, (at, path, is_file, every) in enumerate(element_listings(source, where)):
        if source.kind != "table":
            if is_file:
                raise ConfigError(f"{at}: a {source.kind} source must be a folder, got a file {path!r}")
            suffixes = FOLDER_KINDS[source.kind][0]
            found, files = "folder", with_suffix(every, suffixes)
            if not files.num_rows:
                raise ConfigError(f"{at}: no {source.kind} files ({', '.join(suffixes)}) in {path!r}")
        elif is_file:
            found, files = source.format or format_of(every["path"][0].as_py(), where), every
        else:
            found = source.format
            if not found:
                kinds = [f for f, suffixes in FORMAT_SUFFIXES.items() if with_suffix(every, suffixes).num_rows]
                if len(kinds) != 1:
                    holder = "folder" if isinstance(source.path, str) else f"path[{j}] {path!r}"
                    raise ConfigError(
                        f"{where}.format: {holder} holds {' and '.join(kinds) or 'no table'} files; set format: to one "
                        f"of {', '.join(FORMAT_SUFFIXES)}"
                    )
                found = kinds[0]
            files = with_suffix(every, FORMAT_SUFFIXES[found])
            if not files.num_rows:
                raise ConfigError(f"{at}: no {found} files in {path!r}")
        if fmt not in (None, found):
            raise ConfigError(f"{at}: {path!r} is {found}, but path[0] is {fmt}; a source reads one format")
        fmt = found
        parts.append(files.append_column("element", pa.repeat(pa.scalar(j, pa.int32()), files.num_rows)))
    files = pa.concat_tables(parts)
    check_reached_once(files, where, source.paths)
    files = files.drop_columns(["element"])
    if fmt == "folder":
        return fmt, _folder_chunks(s_index, source, files)
    _check_ids(source, fmt, where)
    return fmt, files


def _check_ids(source: SourceConfig, fmt: str, where: str) -> None:
    if fmt == "webdataset":
        if source.id_column or source.derive_ids:
            raise ConfigError(f"{where}.id_column: a webdataset source's id is each sample's key; remove it")
    elif source.id_column is None and not source.derive_ids:
        raise ConfigError(f"{where}: id_column is required (or set derive_ids: true for ids '<file>:<row>')")


def format_of(path: str, where: str) -> str:
    lower = path.lower()
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if lower.endswith(suffixes):
            return fmt
    raise ConfigError(
        f"{where}.format: cannot tell the format of {path!r}; set format: to one of {', '.join(FORMAT_SUFFIXES)}"
    )


def chunk_key(s_index: int, *parts: Any) -> str:
    digest = hashlib.sha256(repr((s_index, *parts)).encode()).hexdigest()[:24]
    return f"s{s_index}-{digest}"


def source_of_key(key: str) -> int:
    return int(key[1 : key.index("-")])


def _folder_chunks(s_index: int, source: SourceConfig, files: pa.Table) -> pa.Table:
    """Content-defined groups: a group ends after a file whose path hashes to a boundary."""
    rels = files.column("rel").to_pylist()
    versions = files.column("version").to_pylist()
    groups, start = [], 0
    for i, rel in enumerate(rels):
        size = i + 1 - start
        if zlib.crc32(rel.encode()) % FILES_PER_CHUNK == 0 or size >= 4 * FILES_PER_CHUNK or i == len(rels) - 1:
            groups.append((start, i + 1))
            start = i + 1
    return _table(
        [
            ReadChunk(
                key=chunk_key(s_index, "folder", list(zip(rels[a:b], versions[a:b]))),
                source=s_index,
                root=source_root(source),
                format="folder",
                kind=source.kind,
                relpath=rels[a],
                rows=b - a,
                files=tuple(rels[a:b]),
            )
            for a, b in groups
        ]
    )


def _table(chunks: list[ReadChunk]) -> pa.Table:
    """Chunks as rows of the chunk table: ``ReadChunk``'s fields are its columns."""
    return pa.Table.from_pylist([dataclasses.asdict(c) for c in chunks], schema=CHUNK_SCHEMA)


def _folder_schema(kind: str) -> pa.Schema:
    column = FOLDER_KINDS[kind][1]
    return pa.schema([("id", pa.string()), (column, pa.string() if kind in REFERENCE_KINDS else pa.binary())])


def describe_files(job: tuple[int, SourceConfig, str, pa.Table, bool]) -> tuple[pa.Table, pa.Schema, list[str]]:
    """A task: the chunks and unified schema of a batch of table files (Parquet footers, a full
    parse of JSONL/CSV, which has no row count without one, or every header of a WebDataset
    shard), and a warning line per damaged shard."""
    s_index, source, fmt, files, count_on_read = job
    where = f"sources[{s_index}]"
    fs, _ = open_filesystem(source_root(source))
    chunks, schemas, warnings = [], [], []
    for path, rel, version in zip(*(files.column(c).to_pylist() for c in LISTING_SCHEMA.names)):
        file = ReadChunk(
            "",
            s_index,
            source_root(source),
            fmt,
            id_column=source.id_column,
            path=path,
            relpath=rel,
            infer_types=source.infer_types,
        )
        if fmt == "webdataset":
            scan = retrying(_scan, fs, path, rel, count_on_read)
            warnings += [scan.warning] if scan.warning else []
            schema = pa.schema([("id", pa.string()), *sorted(scan.columns.items()), (READ_ERRORS, pa.string())])
            schemas.append(schema)
            for r in scan.ranges:
                key = chunk_key(s_index, fmt, rel, version, (r.start, r.end) if scan.complete else "counted on read")
                chunks.append(
                    dataclasses.replace(
                        file,
                        key=key,
                        first_row=r.first,
                        rows=r.count,
                        bytes=r.end - r.start,
                        start_byte=r.start,
                        end_byte=r.end,
                        counted=scan.complete,
                    )
                )
            continue
        if fmt == "parquet":
            ranges, schema = _row_group_ranges(fs, path, where)
        else:
            table = read_table_file(fs, file)
            ranges, schema = [((), 0, table.num_rows, table.nbytes)], table.schema
        schemas.append(_read_schema(schema, source.id_column))
        for groups, first, count, size in ranges:
            key = chunk_key(s_index, fmt, rel, version, groups)
            chunks.append(
                dataclasses.replace(file, key=key, row_groups=groups, first_row=first, rows=count, bytes=size)
            )
    return _table(chunks), pa.unify_schemas(schemas, promote_options="permissive"), warnings


def _scan(fs: pafs.FileSystem, path: str, rel: str, head_only: bool) -> ShardScan:
    with fs.open_input_file(path) as handle:
        return scan_shard(handle, handle.size(), rel, head_only)


def _read_schema(schema: pa.Schema, id_column: str | None) -> pa.Schema:
    names = [n for n in schema.names if n not in ("id", id_column)]
    return pa.schema([pa.field("id", pa.string())] + [schema.field(n) for n in names])


def _footer(fs: pafs.FileSystem, path: str) -> tuple[pq.FileMetaData, pa.Schema]:
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        return parquet.metadata, parquet.schema_arrow


def _row_group_ranges(fs: pafs.FileSystem, path: str, where: str) -> tuple[list[tuple], pa.Schema]:
    """(row groups, first row, rows, bytes) per chunk of about ROWS_PER_PARQUET_CHUNK rows or
    CHUNK_BYTES uncompressed bytes, whichever comes first, and the schema."""
    try:
        meta, schema = retrying(_footer, fs, path)  # a transient storage error is retried first
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{where}: {path!r} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    ranges, current, rows, size, first = [], [], 0, 0, 0
    for group in range(meta.num_row_groups):
        current.append(group)
        rows += meta.row_group(group).num_rows
        size += meta.row_group(group).total_byte_size
        if rows >= ROWS_PER_PARQUET_CHUNK or size >= CHUNK_BYTES:
            ranges.append((tuple(current), first, rows, size))
            current, first, rows, size = [], first + rows, 0, 0
    if current or not ranges:
        ranges.append((tuple(current), first, rows, size))
    return ranges, schema


def plan_chunks(sources: Sequence[SourceConfig]) -> list[ReadChunk]:
    """The read chunks of some sources, planned here without Ray (for the jobs' own inputs)."""
    return [ReadChunk.from_row(row) for row in plan_sources(sources, LocalTasks()).chunks.to_pylist()]
