"""A source's ``path:``: a file, a folder, a glob (``shards/*.tar``) or a list of them, local or
a URI, and the root its relative paths (chunk keys, derived ids) start from.

A path's root is its folder before any wildcard, or the file itself. A list's root is the
common folder of its elements' parent folders, so ``[photos/2023, photos/2024]`` gives ids
``2023/x.jpg`` and ``2024/x.jpg``, and adding an element later changes no id.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from encoders.core.retry import retrying
from pipeline.config import ConfigError, SourceConfig
from pipeline.filesystems import LISTING_SCHEMA, file_version, join, listing, open_filesystem


def source_root(source: SourceConfig) -> str:
    """The URI that reopens the source's filesystem and that its relative paths start from."""
    if isinstance(source.path, str):
        return split_glob(source.path)[0]
    common = posixpath.commonpath([_parent(_plain(split_glob(p)[0])) for p in source.path])
    first = source.path[0]
    return common if _is_local(first) else f"{first.split('://', 1)[0]}://{common}"


def element_listings(source: SourceConfig, where: str) -> Iterator[tuple[str, str, bool, pa.Table]]:
    """Each path of a source (its one path, or each element of a list): the field that names it
    (``sources[0].path[1]``), the path, whether it is a file, and its files (``LISTING_SCHEMA``)
    with ``rel`` relative to ``source_root``. A path that is missing or a glob that matches
    nothing is a one-line ``ConfigError``."""
    root_uri = source_root(source)
    fs, root = open_filesystem(root_uri)
    single = isinstance(source.path, str)
    for j, path in enumerate(source.paths):
        at = f"{where}.path" if single else f"{where}.path[{j}]"
        base, pattern = split_glob(path)
        prefix = "." if single else posixpath.relpath(_plain(base), _plain(root_uri))
        inner = root if prefix == "." else join(root, prefix)
        entry = retrying(fs.get_file_info, inner)
        if entry.type == pafs.FileType.NotFound:
            if pattern and not single:
                raise ConfigError(f"{at}: no file matches {path!r}")
            raise ConfigError(f"{at}: {base if pattern else path!r} does not exist")
        if entry.type != pafs.FileType.Directory:
            rel = prefix if prefix != "." else inner.rstrip("/").rpartition("/")[2]
            files = pa.table({"path": [inner], "rel": [rel], "version": [file_version(entry)]}, schema=LISTING_SCHEMA)
            yield at, path, True, files
            continue
        files = matching(fs, inner, pattern)
        if pattern and not files.num_rows and not single:  # a single glob: "no <format> files in ..."
            raise ConfigError(f"{at}: no file matches {path!r}")
        if prefix != ".":
            files = files.set_column(1, "rel", pc.binary_join_element_wise(prefix + "/", files["rel"], ""))
        yield at, path, False, files


def check_reached_once(files: pa.Table, where: str, paths: tuple[str, ...]) -> None:
    """A chunk key names a file by its relative path: a file that two elements of a list reach
    (``shards/*.tar`` and ``shards/a.tar``) would be read twice under one key. ``files`` is
    the elements' listings with an ``element`` column (the element's index)."""
    ordered = files.sort_by([("path", "ascending"), ("element", "ascending")])
    if ordered.num_rows < 2:
        return
    again = pc.equal(ordered["path"].slice(1), ordered["path"].slice(0, ordered.num_rows - 1))
    if not pc.any(again).as_py():
        return
    later = ordered.slice(1).filter(again)
    j = pc.min(later["element"]).as_py()
    row = later.filter(pc.equal(later["element"], j)).slice(0, 1).to_pylist()[0]
    first = pc.min(ordered.filter(pc.equal(ordered["path"], row["path"]))["element"]).as_py()
    raise ConfigError(
        f"{where}.path[{j}]: {paths[j]!r} reaches {row['rel']!r}, which path[{first}] reaches too; name each file once"
    )


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _plain(path: str) -> str:
    """A path in one namespace per filesystem: a local one absolute, a URI without its scheme."""
    if _is_local(path):
        return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
    return path.split("://", 1)[1].rstrip("/")


def _parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) or path  # a bucket is its own parent


def split_glob(path: str) -> tuple[str, str | None]:
    """A path or URI with wildcards (``shards/*.tar``, ``s3://b/x/**/part-*.parquet``) -> the
    folder before the first wildcard and the pattern below it; (path, None) without one."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:i]) or ".", "/".join(parts[i:])
    return path, None


def matching(fs: pafs.FileSystem, root: str, pattern: str | None) -> pa.Table:
    """A folder's listing, or only the files whose path below it matches ``pattern``, as a shell
    glob does: ``*`` and ``?`` stay within a folder, ``**/`` spans any number of them."""
    files = listing(fs, root)
    if pattern is None:
        return files
    regex = _glob_regex(pattern)
    keep = [regex.match(rel) is not None for rel in files.column("rel").to_pylist()]
    return files.filter(pa.array(keep, pa.bool_()))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        end = pattern.find("]", i + 1)
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        elif pattern[i] == "[" and end > i:
            out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")
