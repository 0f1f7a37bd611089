"""What the CLI checks before Ray starts, so that a user error costs a second, not the 8-12 s of
starting Ray, and a re-run of a finished output does nothing quickly.

- Every local source path exists; a local table file (or a local folder's first one) holds the
  source's ``id_column`` and the encoders' input columns (its schema only: a Parquet footer, a
  JSONL line, a CSV header).
- Every encoder plans: model found, options valid, D known (``plan_encoders``, no Ray).
- A finished output of the same config whose local sources are unchanged since (by a streaming
  digest of every file's path, size and modification time, kept in the manifest) is reported
  as it is, without starting Ray. Remote sources always go through a run, which re-plans them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Sequence

from pipeline.config import Config, ConfigError, SourceConfig
from pipeline.sources import FORMAT_SUFFIXES


def preflight(config: Config, overwrite: bool = False, dry_run: bool = False) -> dict[str, Any] | None:
    """Raises ``ConfigError`` for a user error found without Ray; returns the manifest of an
    output that is already complete and current, else None."""
    from pipeline.plan import plan_encoders

    for i, source in enumerate(config.sources):
        _check_source(source, i, config)
    specs = plan_encoders(config.encoders)
    if overwrite or dry_run:
        return None
    digest = sources_digest(config.sources)
    if digest is None:
        return None
    from pipeline.filesystems import open_filesystem
    from pipeline.sink import fingerprint, read_manifest

    fs, root = open_filesystem(config.output.path)
    try:
        manifest = read_manifest(fs, root)
    except (OSError, ValueError):
        return None
    if not manifest or manifest.get("status") != "complete" or manifest.get("sources_digest") != digest:
        return None
    # The device is not in the fingerprint; the precision is, as the run resolved ``auto``.
    ran = {k: v.get("precision") for k, v in (manifest.get("encoders") or {}).items()}
    meta = {s.output: s.metadata("cpu", _precision(s, ran.get(s.output))) for s in specs}
    return manifest if manifest.get("fingerprint") == fingerprint(config, meta) else None


def _precision(spec: Any, ran: str | None) -> str:
    wanted = spec.options.get("precision", "auto")
    return (ran or "fp32") if wanted == "auto" else wanted


def sources_digest(sources: Sequence[SourceConfig]) -> str | None:
    """A digest of every local source file's path, size and modification time, built while
    walking (nothing kept per file), or None when a source is not on local disk."""
    digest = hashlib.sha256()
    for element in (p for source in sources for p in source.paths):
        if "://" in element and not element.startswith("file://"):
            return None
        path = os.path.abspath(element.removeprefix("file://"))
        names = sorted(glob.glob(path, recursive=True)) if _is_glob(path) else _walk(path)
        for name in names:
            stat = os.stat(name)
            digest.update(json.dumps([name, stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _walk(path: str) -> Any:
    if os.path.isfile(path):
        yield path
        return
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(folder, name)


def _check_source(source: SourceConfig, i: int, config: Config) -> None:
    where, found = f"sources[{i}]", []
    for j, element in enumerate(source.paths):
        at = f"{where}.path" if isinstance(source.path, str) else f"{where}.path[{j}]"
        path = element.removeprefix("file://")
        if "://" in path:
            continue
        if _is_glob(path):
            if not glob.glob(path, recursive=True):
                raise ConfigError(f"{at}: no file matches {element!r}")
        elif not os.path.exists(path):
            raise ConfigError(f"{at}: {element!r} does not exist")
        else:
            found.append(path)
    if source.kind != "table" or not found:
        return
    path = found[0]  # one file's schema, as for a folder's first file
    first = path if os.path.isfile(path) else next(_tables(path, source.format), None)
    if first is None:
        return  # planning says what the folder lacks
    from pipeline.chunks import _check_ids, format_of

    _check_ids(source, source.format or format_of(first, where), where)
    names = _column_names(first, source)
    if names is None:
        return
    if source.id_column is not None and source.id_column not in names:
        raise ConfigError(
            f"{where}.id_column: {source.id_column!r} is not a column of {os.path.basename(first)!r}; columns: "
            f"{', '.join(names)}"
        )
    # A column an encoder reads may come from another source, another file of a folder, or a
    # later JSON line: only a single Parquet or CSV file has all its columns in one header.
    single = len(config.sources) == 1 and isinstance(source.path, str) and os.path.isfile(path)
    if single and not first.lower().endswith(FORMAT_SUFFIXES["jsonl"]):
        for e, encoder in enumerate(config.encoders):
            for column in encoder.columns.values():
                if column not in names:
                    raise ConfigError(
                        f"encoders[{e}].column: {column!r} is not a source column; columns: {', '.join(names)}"
                    )


def _tables(folder: str, fmt: str | None) -> Any:
    suffixes = FORMAT_SUFFIXES[fmt] if fmt else tuple(s for v in FORMAT_SUFFIXES.values() for s in v)
    for name in _walk(folder):
        if name.lower().endswith(suffixes):
            yield name


def _column_names(path: str, source: SourceConfig) -> list[str] | None:
    """The columns of one local table file from its schema alone, or None when its format has
    none to read cheaply (WebDataset, compressed JSONL/CSV)."""
    import pyarrow as pa

    lower = path.lower()
    try:
        if source.format == "parquet" or lower.endswith(FORMAT_SUFFIXES["parquet"]):
            import pyarrow.parquet as pq

            return pq.read_schema(path).names
        if lower.endswith(".gz") or source.format == "webdataset" or lower.endswith(".tar"):
            return None
        with open(path, encoding="utf-8", errors="replace") as handle:
            line = handle.readline()
        if source.format == "jsonl" or lower.endswith(FORMAT_SUFFIXES["jsonl"]):
            return list(json.loads(line)) if line.strip() else None
        if source.format == "csv" or lower.endswith(FORMAT_SUFFIXES["csv"]):
            import csv

            return next(csv.reader([line], delimiter="\t" if lower.endswith(".tsv") else ","), None)
    except (OSError, ValueError, pa.ArrowInvalid):
        return None  # planning says what is wrong with it, in one line
    return None
