"""Local paths and URIs (anything pyarrow or fsspec reads) as one pyarrow filesystem."""

from __future__ import annotations

import functools
import os

import pyarrow as pa
import pyarrow.fs as pafs


@functools.lru_cache(maxsize=32)
def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it. Local paths become absolute."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec  # ray[data] brings fsspec; it covers memory://, http(s)://, gcs, azure, ...

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def parent_and_name(path: str) -> tuple[str, str]:
    trimmed = path.rstrip("/")
    head, _, name = trimmed.rpartition("/")
    return head or "/", name


def info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def list_files(fs: pafs.FileSystem, root: str, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, path relative to root) of files under root with one of the suffixes, sorted.

    Hidden and underscore-prefixed names (``_manifest.json``, ``.staging``) are skipped.
    """
    out = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        rel = entry.path[len(root.rstrip("/")) + 1 :]
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if entry.path.lower().endswith(suffixes):
            out.append((entry.path, rel))
    return sorted(out, key=lambda item: item[1])
