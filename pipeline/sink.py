"""The Parquet sink: staged part files, the ``omniembed`` metadata, the commit log and
``_manifest.json``.

Write tasks stage each part file outside the dataset folder and move it in only when it is
complete (on object stores, where a PUT is atomic and a move is a copy, they write it straight
to its key). A part is named by a hash of its ids (``part_name``), so a retried task rewrites
the same file instead of adding a duplicate. The driver commits each part as it arrives, to
the commit log (pipeline/commits.py). The manifest's file list together with the log is the
truth: on object stores a rename is not atomic. Each commit records the rows it holds per read
chunk, so a re-run of the same config skips finished chunks whole (pipeline/progress.py).
``record`` refuses a part that would commit more rows of a chunk than planned. ``close`` checks
that every planned row was committed exactly once, and removes any part no commit lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from encoders.core.errors import error_code
from encoders.core.retry import configure as configure_retries
from pipeline.commits import COMMITS, CommitLog, new_run_id
from pipeline.config import Config, ConfigError
from pipeline.filesystems import get, join, open_filesystem, parent_and_name, put
from pipeline.lease import LEASE, WriterLease
from pipeline.sources import CHUNK_COLUMN, parse_tags

MANIFEST = "_manifest.json"
# The output contract's version (CHANGELOG.md). An output of another version never resumes.
FORMAT_VERSION = "5"
PART_PREFIX = "part-"
log = logging.getLogger(__name__)


def staging_path(output: str) -> str:
    parent, name = parent_and_name(output)
    return join(parent, f".{name}.omniembed-staging")


def write_part(
    batch: pa.Table,
    output: str,
    schema: pa.Schema,
    error_columns: list[str],
    retried_io_errors: list[str] | None = None,
    output_format: str = "parquet",
) -> pa.Table:
    """``map_batches`` body: conform a batch to the output schema, stage it, move it in (a
    transient storage error is retried); for a Lance output, write its fragment files (not yet
    part of the dataset: the driver commits them). Returns one row describing the part."""
    configure_retries(retried_io_errors)
    fs, root = open_filesystem(output)
    table = _conform(batch, schema)  # drops the chunk key column
    chunks, totals, breaks = {}, {}, {}  # rows per read chunk: resume counts these, never ids
    if CHUNK_COLUMN in batch.column_names:
        tags = {c["values"]: c["counts"] for c in pc.value_counts(batch.column(CHUNK_COLUMN)).to_pylist()}
        chunks, totals, breaks = parse_tags(tags)
    name = part_name(table.column("id").to_pylist())
    fragments = ""
    if output_format == "lance":
        from pipeline.lance_sink import write_fragment_files

        fragments = write_fragment_files(table, output)
    else:
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        put(fs, join(root, name), buffer.getvalue(), staging_path(root))
    errors: Counter[str] = Counter()
    with_error = None
    for column in error_columns:
        values = table.column(column)
        errors.update(error_code(v) for v in values.drop_null().to_pylist())
        present = pc.is_valid(values)
        with_error = present if with_error is None else pc.or_(with_error, present)
    rows_with_errors = int(pc.sum(with_error).as_py() or 0) if with_error is not None else 0
    return pa.table(
        {
            "name": [name],
            "rows": [table.num_rows],
            "rows_with_errors": [rows_with_errors],
            "errors": [json.dumps(dict(errors))],
            "chunks": [json.dumps(chunks, sort_keys=True)],
            "totals": [json.dumps(totals, sort_keys=True)],  # chunks counted by their read: their counts
            "breaks": [json.dumps(breaks, sort_keys=True)],  # ... and where such a shard breaks
            "fragments": [fragments],
        }
    )


def part_name(ids: list[str]) -> str:
    """``part-<hash>.parquet`` from the part's ids in order, each length-prefixed: two different
    id lists never share a name (a plain join would give ``["a\\nb"]`` and ``["a", "b"]`` one)."""
    digest = hashlib.sha256()
    for value in ids:
        data = value.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return f"{PART_PREFIX}{digest.hexdigest()[:32]}.parquet"


def _conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        column = batch.column(f.name)
        columns.append(column if column.type == f.type else column.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class Sink(Protocol):
    """The driver's side of an output format: the commit protocol every output keeps (a lease,
    a commit log, exactly-once checked at close). ``ParquetSink`` is the Parquet one;
    ``LanceSink`` (pipeline/lance_sink.py) keeps it with Lance fragments and versions."""

    def check(self, overwrite: bool, takeover: bool = False) -> list[dict[str, Any]] | None:
        """Read-only: may this run write here; the parts an earlier run of the config committed."""

    def begin(
        self, expect: Mapping[str, int], schema: pa.Schema | None = None, uncounted: Mapping[str, int] | None = None
    ) -> None:
        """The first write: take the lease, clear or resume, write a ``running`` manifest.
        ``expect``: per read chunk key, the rows this run is to commit; ``schema``: the parts';
        ``uncounted``: chunks whose count their read finds, and the rows earlier runs committed."""

    def record(self, part: Mapping[str, Any]) -> None:
        """Commit one written part (a write task's result row)."""

    def close(
        self, input_rows: int, max_error_rate: float, planned_rows: int | None = None, warnings: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The final manifest: status, counts, timing, the input's warnings; release the lease."""

    def release(self) -> None:
        """A run that stops early (an error, Ctrl-C) releases the folder to the next one."""


@dataclass
class ParquetSink:
    """Driver side: owns the commit log and the manifest of one output folder."""

    config: Config
    encoders_meta: Mapping[str, Any]
    fingerprint: str
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.root = open_filesystem(self.config.output.path)
        self.started = time.time()
        self.log = CommitLog(
            self.fs, self.root, staging_path(self.root), new_run_id(), self.config.output.commit_seconds
        )
        self.lease = WriterLease(self.fs, self.root, self.log.run_id, self.config.output.lease_seconds)
        self.committed_names: set[str] = set()

    # -- opening: fresh, resumed or overwritten ------------------------------------------
    def check(self, overwrite: bool, takeover: bool = False) -> list[dict[str, Any]] | None:
        """Read-only: may this run write here? Returns the commit records of an earlier run of
        the same config (None for a fresh or overwritten run). Nothing is written. Another
        run's live lease refuses, unless ``takeover``."""
        self.overwrite = overwrite
        where = f"output.path: {self.config.output.path!r}"
        entry = self.fs.get_file_info(self.root)
        if entry.type == pafs.FileType.File:
            raise ConfigError(f"{where} is a file; give a folder")
        self.lease.check(where, takeover)
        existing = self._read_manifest()
        listing = self._listing()
        files = [p for p in listing if p.rsplit("/", 1)[-1] != LEASE]  # a run killed as it began leaves a lease only
        if existing is None and files and (not overwrite or not all(self._ours(p) for p in files)):
            raise ConfigError(f"{where} exists and is not an omniembed output; choose another path")
        if existing is not None and not overwrite:
            if str(existing.get("version")) != FORMAT_VERSION:
                raise ConfigError(
                    f"{where} was written in output format {existing.get('version')!r}, this release writes "
                    f"{FORMAT_VERSION!r} (CHANGELOG.md) and cannot resume it: pass --overwrite or choose another path"
                )
            if existing.get("fingerprint") != self.fingerprint:
                raise ConfigError(f"{where} holds a run of a different config or model; pass --overwrite to replace it")
        self.resumed_files = [] if overwrite or existing is None else self._committed(existing, listing)
        return self.resumed_files or None

    def _committed(self, manifest: Mapping[str, Any], listing: list[str]) -> list[dict[str, Any]]:
        """The manifest's files and the commit log's, once each; a committed part that is gone
        is a one-line error."""
        records = _once([*manifest.get("files", []), *self.log.read()])
        present = {path.rsplit("/", 1)[-1] for path in listing}
        missing = [r["name"] for r in records if r["name"] not in present]
        if missing:
            raise ConfigError(
                f"output.path: {self.config.output.path!r}: committed part {missing[0]} is missing "
                f"({len(missing)} of {len(records)} parts); pass --overwrite to embed everything again"
            )
        return records

    def begin(
        self, expect: Mapping[str, int], schema: pa.Schema | None = None, uncounted: Mapping[str, int] | None = None
    ) -> None:
        """The first write: take the writer lease, clear an overwritten run, drop parts no commit
        recorded, write a ``running`` manifest that holds every earlier commit, then clear the
        old log."""
        self.fs.create_dir(self.root, recursive=True)
        self.lease.acquire()
        if self.overwrite:
            for path in self._listing():
                if self._ours(path) and path.rsplit("/", 1)[-1] != LEASE:
                    self.fs.delete_file(path)
        self.committed_names = {f["name"] for f in self.resumed_files}
        self.expect, self.run_rows = dict(expect), Counter()
        self.uncounted, self.totals = dict(uncounted or {}), {}
        self._drop_uncommitted(self.committed_names)
        self.manifest = {
            "version": FORMAT_VERSION,
            "status": "running",
            "fingerprint": self.fingerprint,
            "encoders": dict(self.encoders_meta),
            "config": self.config.to_dict(),
            "files": list(self.resumed_files),
            "resumed_from": len(self.resumed_files) or None,
            "commit_log": f"{COMMITS}/",
        }
        self.fs.create_dir(self.root, recursive=True)
        self._write_manifest()
        self.log.clear()

    def _listing(self) -> list[str]:
        entry = self.fs.get_file_info(self.root)
        if entry.type != pafs.FileType.Directory:
            return []
        return [e.path for e in self.fs.get_file_info(pafs.FileSelector(self.root)) if e.type == pafs.FileType.File]

    @staticmethod
    def _ours(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        if name.startswith(f".{LEASE}.") and name.endswith(".tmp"):  # a lease being renewed
            return True
        return name in (MANIFEST, LEASE) or (name.startswith(PART_PREFIX) and name.endswith(".parquet"))

    def _drop_uncommitted(self, committed: set[str]) -> None:
        """Parts moved in by a run that died before recording them: their ids run again."""
        for path in self._listing():
            name = path.rsplit("/", 1)[-1]
            if name.startswith(PART_PREFIX) and name not in committed:
                log.info("removing uncommitted part %s", name)
                self.fs.delete_file(path)
        staging = staging_path(self.root)
        if self.fs.get_file_info(staging).type == pafs.FileType.Directory:
            self.fs.delete_dir(staging)

    def release(self) -> None:
        self.lease.release()

    # -- progress --------------------------------------------------------------------
    def record(self, part: Mapping[str, Any]) -> None:
        record = self._accept(part)
        if record is not None:
            self._commit(record)

    def _accept(self, part: Mapping[str, Any]) -> dict[str, Any] | None:
        """The part's commit record, or None when it must not be committed: a retried write task
        rewrote a committed part, or it holds rows of a chunk that other parts committed."""
        if part["name"] in self.committed_names:
            return None
        record = {
            "name": part["name"],
            "rows": int(part["rows"]),
            "rows_with_errors": int(part["rows_with_errors"]),
            "errors": json.loads(part["errors"]),
            "chunks": json.loads(part["chunks"]),
        }
        for name in ("totals", "breaks"):  # chunks counted by their read: every part of theirs has both
            value = json.loads(part.get(name) or "{}")
            if value:
                record[name] = value
        for key, total in record.get("totals", {}).items():
            if key in self.uncounted and key not in self.totals:
                self.totals[key] = total
                self.expect[key] = total - self.uncounted[key]
        over = [k for k, n in record["chunks"].items() if self.run_rows[k] + n > self.expect.get(k, 0)]
        if over:  # rows some other part committed already: never twice; close() reports the gap
            log.error("part %s overlaps committed rows of read chunk %s; it is not committed", record["name"], over[0])
            return None
        self.run_rows.update(record["chunks"])
        self.committed_names.add(record["name"])
        return record

    def _commit(self, record: dict[str, Any]) -> None:
        self.manifest["files"].append(record)
        self.log.append(record)

    def close(
        self, input_rows: int, max_error_rate: float, planned_rows: int | None = None, warnings: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Compact the log into the final manifest. ``planned_rows``: the rows this run had to
        commit (input rows less those an earlier run committed); when the commits add up to any
        other number, the status is ``incomplete``. ``warnings``: what planning found damaged
        in the input (a broken shard), one line each; the breaks reads found are added."""
        files = self.manifest["files"]
        found = sorted({line for f in files for line in f.get("breaks", {}).values()})
        warnings = [*warnings, *(line for line in found if line not in warnings)]
        rows = sum(f["rows"] for f in files)
        errors: Counter[str] = Counter()
        for f in files:
            errors.update(f["errors"])
        rows_with_errors = sum(f["rows_with_errors"] for f in files)
        rate = rows_with_errors / input_rows if input_rows else 0.0
        seconds = time.time() - self.started
        new_rows = rows - sum(f["rows"] for f in files[: self.manifest.get("resumed_from") or 0])
        status = "failed_error_rate" if rate > max_error_rate else "complete"
        if planned_rows is not None and new_rows != planned_rows:
            log.error(
                "this run committed %d rows where %d were planned: the output is incomplete", new_rows, planned_rows
            )
            status = "incomplete"
        self.manifest.pop("commit_log", None)
        self.manifest.update(
            {
                "status": status,
                "rows": rows,
                "input_rows": input_rows,
                "planned_rows": planned_rows,
                "rows_with_errors": rows_with_errors,
                "error_rate": rate,
                "errors": dict(sorted(errors.items())),
                "warnings": list(warnings),
                "timing": {
                    "started": _iso(self.started),
                    "finished": _iso(time.time()),
                    "seconds": round(seconds, 3),
                    "rows_this_run": new_rows,
                    "rows_per_second": round(new_rows / seconds, 2) if seconds else None,
                },
            }
        )
        self._write_manifest()
        self.log.clear()
        # The final sweep: a part no commit lists (moved in by a zombie task of a killed driver,
        # or one whose commit was lost) is not part of the output.
        self._drop_uncommitted(self.committed_names)
        self.lease.release()
        return self.manifest

    # -- manifest I/O ------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.fs, self.root)

    def _write_manifest(self) -> None:
        data = json.dumps(self.manifest, indent=2, default=str).encode()
        put(self.fs, join(self.root, MANIFEST), data, staging_path(self.root))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    """An output folder's ``_manifest.json``, or None where there is none."""
    path = join(root, MANIFEST)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return json.loads(get(fs, path))


def committed_parts(output: str) -> list[dict[str, Any]] | None:
    """The parts committed in an output folder so far, also while a run is writing it: the
    manifest's files and the commit log's, once each (None when there is no manifest)."""
    fs, root = open_filesystem(output)
    manifest = read_manifest(fs, root)
    if manifest is None:
        return None
    return _once([*manifest.get("files", []), *CommitLog(fs, root, staging_path(root), "reader").read()])


def _once(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Commit records by part name, the first of each (a compaction may repeat a log's record)."""
    parts: dict[str, dict[str, Any]] = {}
    for record in records:
        parts.setdefault(record["name"], record)
    return list(parts.values())


def fingerprint(config: Config, encoders_meta: Mapping[str, Any]) -> str:
    """What decides the output's content: sources, encoder options and weights, the precision
    they ran in (resolved: never ``auto``), vector format. Resources (batch sizes, pools) do not
    change vectors and are left out."""
    plain = config.to_dict()
    plain.pop("resources", None)
    for encoder in plain["encoders"]:
        encoder.pop("resources", None)
    plain["output"] = {k: plain["output"][k] for k in ("vector_type", "dtype", "on_duplicate_id")}
    models = {
        k: {
            f: v.get(f)
            for f in ("model", "weights_sha256", "dim", "pooling", "normalize", "max_length", "options", "precision")
        }
        for k, v in encoders_meta.items()
    }
    return hashlib.sha256(json.dumps([plain, models], sort_keys=True, default=str).encode()).hexdigest()
