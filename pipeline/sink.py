"""The Parquet sink: staged part files, the ``omniembed`` metadata and ``_manifest.json``.

Write tasks stage each part file outside the dataset folder and move it in only when it is
complete. A part is named by a hash of its ids, so a retried task rewrites the same file
instead of adding a duplicate. The driver records each committed part in the manifest as it
arrives: the manifest's file list is the truth (on object stores, rename is not atomic), and
a re-run of the same config skips the ids of committed parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from encoders.core.errors import error_code
from pipeline.config import Config, ConfigError
from pipeline.filesystems import join, open_filesystem, parent_and_name

MANIFEST = "_manifest.json"
FORMAT_VERSION = "1"
PART_PREFIX = "part-"
log = logging.getLogger(__name__)


def staging_path(output: str) -> str:
    parent, name = parent_and_name(output)
    return join(parent, f".{name}.omniembed-staging")


def write_part(batch: pa.Table, output: str, schema: pa.Schema, error_columns: list[str]) -> pa.Table:
    """``map_batches`` body: conform a batch to the output schema, stage it, move it in.
    Returns one row describing the committed part."""
    fs, root = open_filesystem(output)
    staging = staging_path(root)
    table = _conform(batch, schema)
    digest = hashlib.sha256("\n".join(table.column("id").to_pylist()).encode()).hexdigest()[:24]
    name = f"{PART_PREFIX}{digest}.parquet"
    fs.create_dir(staging, recursive=True)
    staged = join(staging, name)
    with fs.open_output_stream(staged) as stream:
        pq.write_table(table, stream, compression="zstd")
    fs.move(staged, join(root, name))
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
        }
    )


def _conform(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = []
    for f in schema:
        column = batch.column(f.name)
        columns.append(column if column.type == f.type else column.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass
class ParquetSink:
    """Driver side: owns the manifest of one output folder."""

    config: Config
    encoders_meta: Mapping[str, Any]
    fingerprint: str
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fs, self.root = open_filesystem(self.config.output.path)
        self.started = time.time()

    # -- opening: fresh, resumed or overwritten ------------------------------------------
    def check(self, overwrite: bool) -> pa.Array | None:
        """Read-only: may this run write here? Returns the ids committed by an earlier run of
        the same config (None for a fresh or overwritten run). Nothing is written."""
        self.overwrite = overwrite
        entry = self.fs.get_file_info(self.root)
        if entry.type == pafs.FileType.File:
            raise ConfigError(f"output.path: {self.config.output.path!r} is a file; give a folder")
        existing = self._read_manifest()
        listing = self._listing()
        if existing is None and listing and (not overwrite or not all(self._ours(p) for p in listing)):
            raise ConfigError(
                f"output.path: {self.config.output.path!r} exists and is not an omniembed output; choose another path"
            )
        if existing is not None and existing.get("fingerprint") != self.fingerprint and not overwrite:
            raise ConfigError(
                f"output.path: {self.config.output.path!r} holds a run of a different config or model; pass "
                "--overwrite to replace it"
            )
        self.resumed_files = [] if overwrite or existing is None else list(existing.get("files", []))
        if not self.resumed_files:
            return None
        return pa.concat_arrays(
            [
                pq.read_table(join(self.root, f["name"]), columns=["id"], filesystem=self.fs)
                .column("id")
                .combine_chunks()
                for f in self.resumed_files
            ]
        )

    def begin(self) -> None:
        """The first write: clear an overwritten run, drop parts no manifest recorded, and
        write a ``running`` manifest."""
        if self.overwrite:
            for path in self._listing():
                if self._ours(path):
                    self.fs.delete_file(path)
        self._drop_uncommitted({f["name"] for f in self.resumed_files})
        self.manifest = {
            "version": FORMAT_VERSION,
            "status": "running",
            "fingerprint": self.fingerprint,
            "encoders": dict(self.encoders_meta),
            "config": self.config.to_dict(),
            "files": list(self.resumed_files),
            "resumed_from": len(self.resumed_files) or None,
        }
        self.fs.create_dir(self.root, recursive=True)
        self._write_manifest()

    def _listing(self) -> list[str]:
        entry = self.fs.get_file_info(self.root)
        if entry.type != pafs.FileType.Directory:
            return []
        return [e.path for e in self.fs.get_file_info(pafs.FileSelector(self.root)) if e.type == pafs.FileType.File]

    @staticmethod
    def _ours(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return name == MANIFEST or (name.startswith(PART_PREFIX) and name.endswith(".parquet"))

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

    # -- progress --------------------------------------------------------------------
    def record(self, part: Mapping[str, Any]) -> None:
        names = {f["name"] for f in self.manifest["files"]}
        if part["name"] in names:
            return  # a retried write task rewrote the same part
        self.manifest["files"].append(
            {
                "name": part["name"],
                "rows": int(part["rows"]),
                "rows_with_errors": int(part["rows_with_errors"]),
                "errors": json.loads(part["errors"]),
            }
        )
        self._write_manifest()

    def close(self, input_rows: int, max_error_rate: float) -> dict[str, Any]:
        files = self.manifest["files"]
        rows = sum(f["rows"] for f in files)
        errors: Counter[str] = Counter()
        for f in files:
            errors.update(f["errors"])
        rows_with_errors = sum(f["rows_with_errors"] for f in files)
        rate = rows_with_errors / input_rows if input_rows else 0.0
        seconds = time.time() - self.started
        new_rows = rows - sum(f["rows"] for f in files[: self.manifest.get("resumed_from") or 0])
        self.manifest.update(
            {
                "status": "failed_error_rate" if rate > max_error_rate else "complete",
                "rows": rows,
                "input_rows": input_rows,
                "rows_with_errors": rows_with_errors,
                "error_rate": rate,
                "errors": dict(sorted(errors.items())),
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
        staging = staging_path(self.root)
        if self.fs.get_file_info(staging).type == pafs.FileType.Directory:
            self.fs.delete_dir(staging)
        return self.manifest

    # -- manifest I/O ------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any] | None:
        path = join(self.root, MANIFEST)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read())

    def _write_manifest(self) -> None:
        staging = staging_path(self.root)
        self.fs.create_dir(staging, recursive=True)
        tmp = join(staging, MANIFEST)
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(json.dumps(self.manifest, indent=2, default=str).encode())
        self.fs.move(tmp, join(self.root, MANIFEST))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def fingerprint(config: Config, encoders_meta: Mapping[str, Any]) -> str:
    """What decides the output's content: sources, encoder options and weights, vector format.
    Resources (batch sizes, pools) do not change vectors and are left out."""
    plain = config.to_dict()
    plain.pop("resources", None)
    for encoder in plain["encoders"]:
        encoder.pop("resources", None)
    plain["output"] = {k: plain["output"][k] for k in ("vector_type", "dtype", "on_duplicate_id")}
    models = {
        k: {f: v.get(f) for f in ("model", "weights_sha256", "dim", "pooling", "normalize", "max_length", "options")}
        for k, v in encoders_meta.items()
    }
    return hashlib.sha256(json.dumps([plain, models], sort_keys=True, default=str).encode()).hexdigest()
