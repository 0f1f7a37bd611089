"""Local paths and URIs (anything pyarrow or fsspec reads) as one pyarrow filesystem."""

from __future__ import annotations

import functools
import os

import pyarrow as pa
import pyarrow.fs as pafs

from encoders.core.retry import retrying


@functools.lru_cache(maxsize=32)
def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it. Local paths become absolute."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec  # ray[data] brings fsspec; it covers memory://, http(s)://, gcs, azure, ...

        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as exc:  # an unknown protocol, or its backend not installed
            from pipeline.config import ConfigError

            scheme = uri.split("://", 1)[0]
            raise ConfigError(
                f"{uri!r}: no filesystem for {scheme}:// ({str(exc).splitlines()[0]}); install its fsspec backend "
                "(s3fs, gcsfs, adlfs, ...) on every node"
            ) from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def parent_and_name(path: str) -> tuple[str, str]:
    trimmed = path.rstrip("/")
    head, _, name = trimmed.rpartition("/")
    return head or "/", name


def info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def listing(fs: pafs.FileSystem, root: str) -> pa.Table:
    """Every file under root (path, path relative to root, version: size and modification time,
    what an object store's listing gives without a HEAD per file), sorted by relative path.
    Hidden and underscore-prefixed names (``_manifest.json``, ``.staging``) are skipped."""
    paths, rels, versions = [], [], []
    prefix = len(root.rstrip("/")) + 1
    for entry in retrying(fs.get_file_info, pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[prefix:]
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        paths.append(entry.path)
        rels.append(rel)
        versions.append(file_version(entry))
    table = pa.table({"path": paths, "rel": rels, "version": versions}, schema=LISTING_SCHEMA)
    return table.sort_by("rel")


LISTING_SCHEMA = pa.schema([("path", pa.string()), ("rel", pa.string()), ("version", pa.string())])


def file_version(entry: pafs.FileInfo) -> str:
    mtime = entry.mtime_ns if entry.mtime_ns is not None else ""
    return f"{entry.size}:{mtime}"


def with_suffix(files: pa.Table, suffixes: tuple[str, ...]) -> pa.Table:
    """The rows of a ``listing`` whose path ends with one of the suffixes (any case)."""
    keep = [path.lower().endswith(suffixes) for path in files.column("path").to_pylist()]
    return files.filter(pa.array(keep, pa.bool_()))


def list_files(fs: pafs.FileSystem, root: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, path relative to root) of files under root with one of the suffixes, sorted."""
    files = with_suffix(listing(fs, root), suffixes)
    return list(zip(files.column("path").to_pylist(), files.column("rel").to_pylist()))


def put(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer, staging: str) -> None:
    """Write a whole file so that readers never see half of it: on local disk staged in
    ``staging`` and moved in (a rename is atomic); on object stores one PUT (atomic; a move
    would be a COPY and a DELETE). A transient storage error is retried."""

    def write() -> None:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(staging, recursive=True)
            staged = join(staging, f".{path.rsplit('/', 1)[-1]}.{os.getpid()}.tmp")
            with fs.open_output_stream(staged) as stream:
                stream.write(data)
            fs.move(staged, path)
        else:
            with fs.open_output_stream(path) as stream:
                stream.write(data)

    retrying(write)


def get(fs: pafs.FileSystem, path: str) -> bytes:
    """A whole file; a transient storage error is retried."""

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return retrying(read)


def check_filesystems(paths: list[str]) -> None:
    """Before Ray starts: every URI's filesystem exists here (a one-line ``ConfigError`` names a
    protocol with no installed backend)."""
    for path in paths:
        if "://" in path:
            open_filesystem(path)
