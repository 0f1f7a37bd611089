"""WebDataset shards: tar files whose members are grouped into samples by key.

A member ``a/b/000123.seg.png`` belongs to sample ``a/b/000123`` (the path up to the first ``.``
of its basename) and fills its column ``seg.png`` (the rest). A sample's members are consecutive,
as WebDataset writes them (a key seen again later is another sample: a duplicate id). The id is
the key verbatim. Text members (``txt``, ``json``, ...) are decoded as UTF-8; every other member
stays bytes for the image and audio prepare stages.

A tar has no index, so planning reads every header: on a seekable file, one 512-byte header per
member, skipping the data (``tarfile`` seeks past it). Each read chunk is a byte range of a
shard that starts at a sample's first header, so a read seeks there and streams only its
samples. A shard that breaks (truncated, or a damaged header) keeps the samples whose members
all lie before the break; the break is one warning line of the run.

With ``on_duplicate_id: trust`` (and no join), planning reads only the first ``HEAD_SAMPLES``
samples of each shard (its columns, and the mean sample size to estimate its count): a shard
longer than that is one read chunk whose count is found by the read, which reads it whole and
tolerates a break the same way. The read tags its rows with the count (pipeline/sources.py), so
the commit records carry it (pipeline/sink.py) and resume and the exactly-once check use it.

A member that cannot become a value (invalid UTF-8 text, a member past ``MAX_MEMBER_BYTES``)
is null in its column and named in the row's ``READ_ERRORS`` JSON, which the prepare stage turns
into that row's error value when the column is embedded (pipeline/stages.py).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from encoders.core.retry import is_transient

TEXT_EXTENSIONS = ("txt", "text", "json", "cls")
READ_ERRORS = "_omniembed_read_errors"  # per row: JSON {column: "code: message"}, or null
MAX_MEMBER_BYTES = 512 * 2**20  # one member read into memory at most (an image's max_bytes)
SAMPLES_PER_CHUNK = 65_536
CHUNK_BYTES = 256 * 2**20
HEAD_SAMPLES = 256  # counted during the read (trust): the samples planning reads per shard
BREAK = b"omniembed.break"  # a read table's metadata: the shard's break, when it has one


def split_name(name: str) -> tuple[str, str]:
    """Member path -> (sample key, column): ``a/b/000123.seg.png`` -> (``a/b/000123``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, dot, column = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, column if dot else ""


def is_text(column: str) -> bool:
    return column.rpartition(".")[2].lower() in TEXT_EXTENSIONS


@dataclass
class ShardRange:
    """Consecutive samples of one shard: bytes ``start`` (the first sample's first header) to
    ``end`` (exclusive), ``count`` samples, the first of them sample ``first`` of the shard."""

    start: int
    end: int = 0
    first: int = 0
    count: int = 0


@dataclass
class ShardScan:
    ranges: list[ShardRange]
    columns: dict[str, pa.DataType] = field(default_factory=dict)
    warning: str | None = None
    complete: bool = True  # False: only the head was read; one range, the whole shard, its count estimated


def scan_shard(handle: BinaryIO, size: int, name: str, head_only: bool = False) -> ShardScan:
    """Every header of a seekable shard, the data skipped: its ranges of about SAMPLES_PER_CHUNK
    samples or CHUNK_BYTES bytes, and the columns its members give. ``head_only``: stop at
    HEAD_SAMPLES samples; a longer shard is one range whose count is estimated from their size."""
    head = HEAD_SAMPLES if head_only else None
    ranges: list[ShardRange] = []
    columns: dict[str, pa.DataType] = {}
    current: ShardRange | None = None
    key, samples, warning = None, 0, None
    sample_start = 0  # the first header of the sample being scanned
    partial = True  # does the break fall inside the sample being scanned? (a damaged header: maybe)
    try:
        for member in _members(handle):
            sample, column = split_name(member.name)
            if member.offset_data + member.size > size:
                partial = sample == key
                raise tarfile.ReadError(f"member {member.name!r} is cut off at byte {size}")
            if not member.isfile():
                continue
            if sample != key:
                if head is not None and samples == head:
                    estimate = max(head + 1, round(size * head / max(1, member.offset - ranges[0].start)))
                    return ShardScan([ShardRange(0, size, 0, estimate)], columns, complete=False)
                if (
                    current is None
                    or current.count >= SAMPLES_PER_CHUNK
                    or member.offset - current.start >= CHUNK_BYTES
                ):
                    current = ShardRange(member.offset, first=samples)
                    ranges.append(current)
                key, samples, sample_start = sample, samples + 1, member.offset
                current.count += 1
            columns.setdefault(column, pa.string() if is_text(column) else pa.binary())
            current.end = member.offset_data + _padded(member.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if is_transient(exc):
            raise  # the store, not the shard: retried by the caller
        if current is not None and samples and partial:  # the sample the break falls in is left out
            current.count -= 1
            current.end = sample_start
            samples -= 1
        warning = _break_line(name, samples, exc)
    return ShardScan([r for r in ranges if r.count > 0] or [ShardRange(0)], columns, warning)


def _break_line(name: str, samples: int, exc: BaseException) -> str:
    """The one warning line of a shard that breaks after ``samples`` complete samples."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{name}: the shard breaks after {samples} complete samples ({message}); those samples are read"


def _members(handle: BinaryIO, start: int = 0) -> Iterator[tarfile.TarInfo]:
    """The members from ``start``, one header at a time (the data is skipped by seeking), without
    the member list ``tarfile`` keeps growing: a shard of 10^6 members stays small."""
    handle.seek(start)
    with tarfile.open(fileobj=handle, mode="r:") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()
            yield member


def _padded(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def read_range(
    fs: pafs.FileSystem, path: str, start: int, end: int, columns: list[str] | None, tolerant: bool = False
) -> pa.Table:
    """A range's samples: ``id`` (the key), one column per member extension and READ_ERRORS.
    ``columns`` limits the members read (``[]``: the keys only, from the headers). ``tolerant``
    (a shard planning did not scan): a break keeps the complete samples before it, and the
    table's metadata holds the break's line under ``BREAK``."""
    rows: list[dict[str, Any]] = []
    keys: list[str] = []
    warning = None
    with fs.open_input_file(path) as handle:
        size = handle.size()
        partial = True  # does the break fall inside the last sample? (a damaged header: maybe)
        try:
            for member in _members(handle, start):
                if member.offset >= end:
                    break
                if not member.isfile():
                    continue
                sample, column = split_name(member.name)
                if member.offset_data + member.size > size:
                    partial = bool(keys) and keys[-1] == sample
                    raise tarfile.ReadError(f"member {member.name!r} is cut off at byte {size}")
                if not keys or keys[-1] != sample:
                    keys.append(sample)
                    rows.append({})
                if columns is None or column in columns:
                    rows[-1][column] = _member_value(handle, member, column, rows[-1])
        except (tarfile.TarError, EOFError, OSError) as exc:
            if not tolerant or is_transient(exc):
                raise
            if keys and partial:
                keys.pop()
                rows.pop()
            warning = _break_line(path.rstrip("/").rpartition("/")[2], len(keys), exc)
    names = sorted({c for row in rows for c in row if c != READ_ERRORS})
    data: dict[str, Any] = {"id": pa.array(keys, pa.string())}
    for name in names:
        data[name] = pa.array([row.get(name) for row in rows], pa.string() if is_text(name) else pa.binary())
    data[READ_ERRORS] = pa.array([row.get(READ_ERRORS) for row in rows], pa.string())
    table = pa.table(data)
    return table.replace_schema_metadata({BREAK: warning.encode()}) if warning else table


def _member_value(handle: Any, member: tarfile.TarInfo, column: str, row: dict[str, Any]) -> Any:
    if member.size > MAX_MEMBER_BYTES:
        _row_error(row, column, f"too_large: member of {member.size} bytes, limit {MAX_MEMBER_BYTES}")
        return None
    position = handle.tell()
    handle.seek(member.offset_data)
    data = handle.read(member.size)
    handle.seek(position)
    if not is_text(column):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _row_error(row, column, f"decode_failed: invalid UTF-8 at byte {exc.start} of member {member.name!r}")
        return None


def _row_error(row: dict[str, Any], column: str, error: str) -> None:
    errors = json.loads(row.get(READ_ERRORS) or "{}")
    errors[column] = error
    row[READ_ERRORS] = json.dumps(errors)


def read_errors(table: pa.Table) -> list[dict[str, str]] | None:
    """Per row, the members that could not become values, or None when no row has any."""
    if READ_ERRORS not in table.column_names or table.column(READ_ERRORS).null_count == table.num_rows:
        return None
    return [json.loads(v) if v else {} for v in table.column(READ_ERRORS).to_pylist()]
