"""The Lance sink: the output folder is a Lance dataset that ``lance.dataset(path)`` and LanceDB
open directly, written under the same commit protocol as Parquet (pipeline/sink.py).

- Write tasks write a part's rows as Lance fragment files (``write_fragments``: data files, no
  dataset version) and return their metadata with the part's commit record.
- The driver commits the fragments of the parts that arrived in the last ``commit_seconds`` as
  one Lance version (``Append``; the first is an ``Overwrite`` that creates the dataset), and
  only then adds their records to the commit log. A killed driver therefore leaves either
  fragments in the dataset that no record lists (removed when the next run begins: a Lance
  ``Delete`` of those fragments) or fragment files that no version references (never read).
- Resume, the writer lease, ``_manifest.json`` and exactly-once at close are the Parquet sink's:
  the bookkeeping files sit beside Lance's own folders, which Lance ignores.
- At the end, optionally, one vector index per embedding column (``output.index``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from encoders.core.retry import retrying
from pipeline.config import ConfigError
from pipeline.filesystems import join
from pipeline.sink import ParquetSink, committed_parts

LANCE_DIRS = ("data", "_versions", "_transactions", "_indices", "_deletions")
INDEX_TYPES = {"ivf_pq": "IVF_PQ", "ivf_flat": "IVF_FLAT", "ivf_hnsw_sq": "IVF_HNSW_SQ"}
log = logging.getLogger(__name__)


def write_fragment_files(table: pa.Table, output: str) -> str:
    """A write task's part as Lance data files; their fragment metadata as JSON."""
    from lance.fragment import write_fragments

    fragments = retrying(write_fragments, table, output, schema=table.schema)
    return json.dumps([f.to_json() for f in fragments])


def data_files(fragments: Sequence[Mapping[str, Any]]) -> set[str]:
    return {f["path"] for fragment in fragments for f in fragment["files"]}


def is_lance(fs: pafs.FileSystem, root: str) -> bool:
    return fs.get_file_info(join(root, "_versions")).type == pafs.FileType.Directory


class LanceSink(ParquetSink):
    """Driver side of a Lance output."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pending: list[dict[str, Any]] = []
        self.last_commit = time.monotonic()
        self.schema: pa.Schema | None = None

    def _dataset(self) -> Any:
        import lance

        if not is_lance(self.fs, self.root):
            return None
        return retrying(lance.dataset, self.config.output.path)

    def check(self, overwrite: bool, takeover: bool = False) -> list[dict[str, Any]] | None:
        if not overwrite and is_lance(self.fs, self.root) and self._read_manifest() is None:
            raise ConfigError(
                f"output.path: {self.config.output.path!r} is a Lance dataset omniembed did not write; choose "
                "another path"
            )
        return super().check(overwrite, takeover)

    def _committed(self, manifest: Mapping[str, Any], listing: list[str]) -> list[dict[str, Any]]:
        records = committed_parts(self.config.output.path) or []
        dataset = self._dataset()
        present = _files_of(dataset) if dataset is not None else set()
        missing = [r["name"] for r in records if not data_files(r.get("fragments", [])) <= present]
        if missing:
            raise ConfigError(
                f"output.path: {self.config.output.path!r}: committed part {missing[0]} is not in the Lance dataset "
                f"({len(missing)} of {len(records)} parts); pass --overwrite to embed everything again"
            )
        return records

    def begin(
        self, expect: Mapping[str, int], schema: pa.Schema | None = None, uncounted: Mapping[str, int] | None = None
    ) -> None:
        self.schema = schema
        super().begin(expect, uncounted=uncounted)
        if self.overwrite:
            for name in LANCE_DIRS:
                if self.fs.get_file_info(join(self.root, name)).type == pafs.FileType.Directory:
                    self.fs.delete_dir(join(self.root, name))
            return
        self._drop_unrecorded_fragments()

    def _drop_unrecorded_fragments(self) -> None:
        """Fragments a killed driver committed to Lance before it could record them: their
        rows run again, so they leave the dataset."""
        dataset = self._dataset()
        if dataset is None:
            return
        recorded = set().union(*(data_files(r.get("fragments", [])) for r in self.resumed_files))
        extra = [f.fragment_id for f in dataset.get_fragments() if not _fragment_files(f) <= recorded]
        if extra:
            import lance

            log.info("removing %d Lance fragments no commit records", len(extra))
            operation = lance.LanceOperation.Delete([], extra, "true")
            retrying(lance.LanceDataset.commit, self.config.output.path, operation, read_version=dataset.version)

    def record(self, part: Mapping[str, Any]) -> None:
        record = self._accept(part)
        if record is None:
            return
        record["fragments"] = json.loads(part["fragments"] or "[]")
        self.pending.append(record)
        if time.monotonic() - self.last_commit >= self.config.output.commit_seconds:
            self._flush()

    def _flush(self) -> None:
        """One Lance version for the pending parts' fragments, then their commit records."""
        self.last_commit = time.monotonic()
        if not self.pending:
            return
        import lance
        from lance.fragment import FragmentMetadata

        fragments = [FragmentMetadata.from_json(json.dumps(f)) for r in self.pending for f in r["fragments"]]
        dataset = self._dataset()
        if dataset is None:
            operation = lance.LanceOperation.Overwrite(self.schema, fragments)
            retrying(lance.LanceDataset.commit, self.config.output.path, operation)
        else:
            operation = lance.LanceOperation.Append(fragments)
            retrying(lance.LanceDataset.commit, self.config.output.path, operation, read_version=dataset.version)
        for record in self.pending:
            self._commit(record)
        self.pending = []

    def close(
        self, input_rows: int, max_error_rate: float, planned_rows: int | None = None, warnings: Sequence[str] = ()
    ) -> dict[str, Any]:
        self._flush()
        if self._dataset() is None and self.schema is not None:  # nothing to embed: an empty dataset still opens
            import lance

            retrying(lance.write_dataset, self.schema.empty_table(), self.config.output.path, mode="overwrite")
        notes = list(warnings)
        if self.config.output.index:
            notes += self._build_indexes()
        return super().close(input_rows, max_error_rate, planned_rows, notes)

    def _build_indexes(self) -> list[str]:
        """One vector index per embedding column; a column too small to train one is a warning."""
        dataset = self._dataset()
        notes = []
        for field in dataset.schema:
            if not field.name.endswith("_embedding"):
                continue
            rows = dataset.count_rows(filter=f"{field.name} IS NOT NULL")
            dim = field.type.list_size
            kwargs: dict[str, Any] = {"num_partitions": max(1, min(256, int(math.sqrt(rows))))}
            if self.config.output.index == "ivf_pq":
                kwargs["num_sub_vectors"] = max(d for d in range(1, min(dim, 96) + 1) if dim % d == 0 and dim // d >= 4)
            try:
                dataset.create_index(
                    field.name, index_type=INDEX_TYPES[self.config.output.index], metric="cosine", **kwargs
                )
                dataset = self._dataset()
            except (ValueError, OSError, RuntimeError) as exc:
                first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                notes.append(f"no {self.config.output.index} index on {field.name} ({rows} vectors): {first}")
                log.warning("%s", notes[-1])
        return notes


def _fragment_files(fragment: Any) -> set[str]:
    return {f.path for f in fragment.metadata.data_files()}


def _files_of(dataset: Any) -> set[str]:
    return set().union(*(_fragment_files(f) for f in dataset.get_fragments()))


def committed_lance_ids(output: str, names: Sequence[str]) -> pa.Array:
    """The ids of some committed parts of a Lance output (the read stage's re-planned chunks)."""
    import lance

    wanted = set(names)
    files = set().union(
        *(data_files(r.get("fragments", [])) for r in committed_parts(output) or [] if r["name"] in wanted)
    )
    dataset = retrying(lance.dataset, output)
    fragments = [f for f in dataset.get_fragments() if _fragment_files(f) & files]
    if not fragments:
        return pa.array([], pa.string())
    ids = [f.to_table(columns=["id"]).column("id") for f in fragments]
    return pa.chunked_array([c for column in ids for c in column.chunks], pa.string()).combine_chunks()
