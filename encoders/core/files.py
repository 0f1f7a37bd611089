"""Reading a row's input file: a local path, ``file://``, any pyarrow/fsspec URI, or raw bytes.

Shared by the image and audio prepare stages. Failures raise ``RowError`` carrying a closed
error code (encoders/core/errors.py), which the prepare stage turns into the row's error value.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, BinaryIO, Iterator

import pyarrow as pa

from encoders.core.retry import retrying


class RowError(Exception):
    """A bad row: carries the error code for ``error_value``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_bytes(value: Any, max_bytes: int | None = None) -> bytes:
    """The whole content of a path/URI, or the bytes themselves (non-empty). Past ``max_bytes``
    the row is a ``too_large`` error: a file is never read further than ``max_bytes + 1``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise RowError("decode_failed", "zero bytes")
        data = bytes(value)
    else:
        data = retrying(_read_all, value, max_bytes)  # a transient storage error is retried, then raised
        if not data:
            raise RowError("decode_failed", f"{value!r} has zero bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise RowError("too_large", f"more than {max_bytes} bytes, limit max_bytes={max_bytes}")
    return data


_FILESYSTEMS: dict[str, tuple[Any, str]] = {}  # "scheme://netloc" -> (filesystem, inner path prefix)


def _filesystem(value: str) -> tuple[Any, str]:
    """The filesystem of a URI and the path inside it, one filesystem per bucket and process:
    building an S3 or GCS client per row costs more than reading a small image."""
    import pyarrow.fs as pafs

    scheme, _, rest = value.partition("://")
    netloc, _, tail = rest.partition("/")
    root = f"{scheme}://{netloc}"
    if root in _FILESYSTEMS and "%" not in value:
        fs, prefix = _FILESYSTEMS[root]
        return fs, prefix + tail
    try:
        fs, inner = pafs.FileSystem.from_uri(value)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec  # memory://, http(s)://, ... (ray[data] brings fsspec)

        fsspec_fs, inner = fsspec.core.url_to_fs(value)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    if tail and inner.endswith(tail) and "%" not in value:  # how this filesystem spells paths
        _FILESYSTEMS[root] = (fs, inner[: len(inner) - len(tail)])
    return fs, inner


def _read_all(value: Any, max_bytes: int | None = None) -> bytes:
    with open_input(value) as handle:
        return handle.read() if max_bytes is None else handle.read(max_bytes + 1)


@contextlib.contextmanager
def open_input(value: Any) -> Iterator[BinaryIO]:
    """A seekable binary file for a path/URI or bytes, so a decoder can read only what it needs
    (a one-hour audio file is never read whole). Missing files raise ``missing_file``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise RowError("decode_failed", "zero bytes")
        yield io.BytesIO(value)
        return
    if not isinstance(value, str):
        raise RowError("bad_type", f"expected a path, URI or bytes, got {type(value).__name__}")
    if not value.strip():
        raise RowError("missing_file", "empty path")
    if "://" not in value or value.startswith("file://"):
        path = os.path.expanduser(value[len("file://") :] if value.startswith("file://") else value)
        try:
            handle: BinaryIO = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise RowError("missing_file", f"{value!r} does not exist") from None
        except PermissionError:
            raise RowError("missing_file", f"{value!r} cannot be read (permission denied)") from None
    else:
        handle = retrying(_open_uri, value)
    with handle:
        yield handle


def _open_uri(value: str) -> BinaryIO:
    try:
        fs, inner = _filesystem(value)
        return fs.open_input_file(inner)  # random access: readers seek instead of reading all
    except FileNotFoundError:
        raise RowError("missing_file", f"{value!r} does not exist") from None
