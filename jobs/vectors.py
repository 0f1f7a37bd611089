"""Reading omniembed's output through its contract (DESIGN.md, "Contract").

- The part files are the manifest's committed list when ``_manifest.json`` is there (the truth
  on object stores), else the folder's ``*.parquet`` files. A Lance output is read through
  ``lance.dataset`` (its current version).
- D, the model and its options come from the ``omniembed`` Parquet metadata, never from the data.
- Vectors are nullable: a null row (absent or failed input) is skipped and counted.
- Every non-null vector must have exactly D values; anything else is a user error naming the row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.entrypoint import JobError
from pipeline.filesystems import join, list_files, open_filesystem

MANIFEST = "_manifest.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """An omniembed output folder: its part files, metadata and (when present) manifest."""

    path: str
    fs: pafs.FileSystem
    files: tuple[str, ...]
    schema: pa.Schema
    metadata: Mapping[str, Any]
    manifest: Mapping[str, Any] | None
    lance: Any = None  # a lance.LanceDataset for a Lance output

    @property
    def vector_columns(self) -> list[str]:
        return [f.name for f in self.schema if f.name.endswith("_embedding")]

    def fingerprint(self) -> list[list[Any]]:
        """Part names and sizes (a Lance output: its version): an index built on the dataset is
        stale when they change."""
        if self.lance is not None:
            return [["lance", self.lance.version]]
        return [[f.rpartition("/")[2], self.fs.get_file_info(f).size] for f in self.files]

    def read(self, columns: Sequence[str]) -> pa.Table:
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise JobError(
                f"column {missing[0]!r} is not in dataset {self.path!r}; its columns: {', '.join(self.schema.names)}"
            )
        if self.lance is not None:
            return self.lance.to_table(columns=list(columns))
        tables = [pq.read_table(f, columns=list(columns), filesystem=self.fs) for f in self.files]
        return pa.concat_tables(tables) if tables else self.schema.empty_table().select(list(columns))


def open_dataset(path: str) -> Dataset:
    fs, root = open_filesystem(path)
    entry = fs.get_file_info(root)
    if entry.type == pafs.FileType.NotFound:
        raise JobError(f"dataset {path!r} does not exist; give an omniembed output folder (e.g. out/products)")
    if entry.type == pafs.FileType.File:
        raise JobError(f"dataset {path!r} is a file; give the omniembed output folder that holds it")
    manifest = _read_manifest(fs, root)
    if fs.get_file_info(join(root, "_versions")).type == pafs.FileType.Directory:
        return _open_lance(path, fs, manifest)
    if manifest is not None:
        if manifest.get("status") == "running":
            log.warning("dataset %s: its run has not finished (status running); reading the committed parts", path)
        files = tuple(join(root, f["name"]) for f in manifest.get("files", []))
    else:
        files = tuple(p for p, _ in list_files(fs, root, (".parquet",)) if "/" not in p[len(root.rstrip("/")) + 1 :])
    if not files:
        raise JobError(f"dataset {path!r} holds no Parquet part files; run omniembed on it first")
    try:
        schema = pq.read_schema(files[0], filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise JobError(f"dataset {path!r}: {files[0]!r} is not readable Parquet ({str(exc).splitlines()[0]})") from None
    raw = (schema.metadata or {}).get(b"omniembed")
    if raw is None:
        raise JobError(f"dataset {path!r} has no 'omniembed' Parquet metadata; it was not written by omniembed")
    return Dataset(path, fs, files, schema, json.loads(raw), manifest)


def _open_lance(path: str, fs: pafs.FileSystem, manifest: Mapping[str, Any] | None) -> Dataset:
    try:
        import lance
    except ImportError:
        raise JobError(f"dataset {path!r} is a Lance dataset: pip install 'omniembed[lance]'") from None
    dataset = lance.dataset(path)
    raw = (dataset.schema.metadata or {}).get(b"omniembed")
    if raw is None:
        raise JobError(f"dataset {path!r} has no 'omniembed' metadata; it was not written by omniembed")
    return Dataset(path, fs, (), dataset.schema, json.loads(raw), manifest, dataset)


def _read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(join(root, MANIFEST)) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class EncoderEntry:
    """The metadata of the encoder that wrote one vector column, and which of its inputs."""

    output: str
    modality: str
    meta: Mapping[str, Any]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def normalized(self) -> bool:
        return bool(self.meta.get("normalize"))


def encoder_for_column(dataset: Dataset, column: str) -> EncoderEntry:
    """``<output>_embedding`` (one input) or ``<output>_<modality>_embedding`` (CLIP-like)."""
    if column not in dataset.schema.names:
        raise JobError(
            f"column {column!r} is not in dataset {dataset.path!r}; vector columns: "
            f"{', '.join(dataset.vector_columns) or '(none)'}"
        )
    for output, meta in dataset.metadata.get("encoders", {}).items():
        modalities = list(meta.get("columns") or {})
        if column == f"{output}_embedding" and len(modalities) <= 1:
            return EncoderEntry(output, modalities[0] if modalities else "text", meta)
        for modality in modalities:
            if len(modalities) > 1 and column == f"{output}_{modality}_embedding":
                return EncoderEntry(output, modality, meta)
    raise JobError(
        f"column {column!r} of {dataset.path!r} is not a vector column of any encoder in its metadata; "
        f"vector columns: {', '.join(dataset.vector_columns) or '(none)'}"
    )


@dataclass
class VectorColumn:
    """The non-null vectors of one column: ``vectors`` (n, D) float32, row i belongs to ``ids[i]``."""

    dataset: Dataset
    column: str
    encoder: EncoderEntry
    ids: np.ndarray  # (n,) str
    vectors: np.ndarray  # (n, D) float32
    total_rows: int
    extra: dict[str, list[Any]] = field(default_factory=dict)  # requested columns, aligned with ids

    @property
    def nulls(self) -> int:
        return self.total_rows - len(self.ids)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def row_of(self, id_: str) -> int:
        hits = np.flatnonzero(self.ids == id_)
        if not len(hits):
            raise JobError(f"id {id_!r} has no vector in column {self.column!r} of {self.dataset.path!r}")
        return int(hits[0])


def read_vectors(path: str | Dataset, column: str, extra_columns: Sequence[str] = ()) -> VectorColumn:
    dataset = path if isinstance(path, Dataset) else open_dataset(path)
    encoder = encoder_for_column(dataset, column)
    table = dataset.read(list(dict.fromkeys(["id", column, *extra_columns])))
    values = table.column(column).combine_chunks()
    present = pc.is_valid(values)
    kept = table.filter(present)
    vectors = vectors_to_numpy(kept.column(column).combine_chunks(), encoder.dim, column, kept.column("id"))
    extra = {c: kept.column(c).to_pylist() for c in extra_columns if c not in ("id", column)}
    result = VectorColumn(
        dataset,
        column,
        encoder,
        np.asarray(kept.column("id").to_pylist(), dtype=object),
        vectors,
        table.num_rows,
        extra,
    )
    if result.nulls:
        log.info("%s: %d of %d rows have no vector (null) and are skipped", column, result.nulls, table.num_rows)
    return result


def vectors_to_numpy(values: pa.Array, dim: int, column: str, ids: Any) -> np.ndarray:
    """Non-null list or fixed_size_list vectors -> (n, dim) float32; every row must hold ``dim`` values."""
    if len(values) == 0:
        return np.zeros((0, dim), np.float32)
    if pa.types.is_fixed_size_list(values.type):
        width = values.type.list_size
        if width != dim:
            raise JobError(f"column {column!r} holds {width}-value vectors, but its metadata says dim {dim}")
        flat = values.flatten()
    elif pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            raise JobError(
                f"column {column!r}: row {ids[int(bad[0])]!s} has {int(lengths[bad[0]])} values, "
                f"but the metadata says dim {dim}; re-run omniembed or fix the file"
            )
        flat = values.flatten()
    else:
        raise JobError(f"column {column!r} is {values.type}, not a vector column (list<float32>)")
    array = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return array.reshape(len(values), dim)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, D) unit rows; an all-zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
