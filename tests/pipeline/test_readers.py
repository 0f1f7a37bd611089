"""The output contract, checked with the README's one-line reads (pyarrow, pandas, polars, Ray,
DuckDB) on real runs of the bundled all-MiniLM-L6-v2.

One small input (real text, a near-duplicate pair, null, empty and whitespace titles) is
embedded once per output format: nullable ``list<float32>``, ``fixed_size_list<float32>[D]`` and
``list<float16>``. Every reader must see every id exactly once, the same vectors as pyarrow and
nulls exactly where the input was absent or empty; the metadata, manifest and folder must match
DESIGN.md's contract; and the vectors must equal sentence-transformers' own ``encode``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
D = 384
VECTOR = "title_embedding"
ERROR = "title_error"
ROWS_PER_FILE = 6  # several part files, so every reader has to combine them

# The near-duplicate pair for the DuckDB similarity check.
ORIGINAL_ID, NEAR_DUP_ID = "shoe", "shoe-dup"
HAND_TITLES: dict[str, str | None] = {
    ORIGINAL_ID: "Red running shoes for men, lightweight mesh",
    NEAR_DUP_ID: "red running shoe for men - light mesh",
    "mug": "Blue ceramic coffee mug, 350 ml",
    "tea": "Green tea with jasmine, 100 loose-leaf bags",
    "cat": "A cat sleeping on the sofa in the afternoon sun",
    "cafe": "Café crème brûlée, naïve façade",
    "null-1": None,
    "empty": "",
    "null-2": None,
    "blank": "   \t ",
}
ABSENT = {"null-1", "null-2"}  # null input: null vector, null error
EMPTY = {"empty", "blank"}  # present but empty: null vector, error 'empty_text: ...'
OUTPUT_FIELDS = (
    "model",
    "family",
    "revision",
    "weights_sha256",
    "dim",
    "dtype",
    "pooling",
    "normalize",
    "max_length",
    "device",
    "precision",
)
FORMATS = [("list", "float32"), ("fixed_size_list", "float32"), ("list", "float16")]


@dataclass(frozen=True)
class Output:
    path: str
    vector_type: str
    dtype: str
    config: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@pytest.fixture(scope="module")
def titles(real_texts) -> dict[str, str | None]:
    """Hand-written product titles, a few real documentation paragraphs, and one long text
    (well past MiniLM's 256 tokens, so truncation must match sentence-transformers')."""
    rows = dict(HAND_TITLES)
    for i, text in enumerate(real_texts[:6]):
        rows[f"doc-{i}"] = text
    rows["long"] = " ".join(real_texts[6:60])
    return rows


@pytest.fixture(scope="module")
def input_parquet(titles, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("readers-in") / "titles.parquet"
    pq.write_table(
        pa.table(
            {"id": list(titles), "title": list(titles.values())},
            schema=pa.schema([("id", pa.string()), ("title", pa.string())]),
        ),
        path,
    )
    return str(path)


@pytest.fixture(scope="module", params=FORMATS, ids=lambda f: "-".join(f))
def output(request, ray_session, input_parquet, tmp_path_factory) -> Output:
    from pipeline.graph import run

    vector_type, dtype = request.param
    path = tmp_path_factory.mktemp("readers-out") / f"out_{vector_type}_{dtype}"
    config = {
        "sources": [{"path": input_parquet, "id_column": "id"}],
        "encoders": [{"output": "title", "column": "title", "model": MINILM_ID}],
        "output": {
            "path": str(path),
            "vector_type": vector_type,
            "dtype": dtype,
            "max_error_rate": 1.0,
            "rows_per_file": ROWS_PER_FILE,
        },
    }
    manifest = run(config, overwrite=True)
    return Output(str(path), vector_type, dtype, config, manifest)


@pytest.fixture(scope="module")
def reference(minilm_path, titles) -> dict[str, np.ndarray]:
    """sentence-transformers' own vectors for the rows with real text."""
    from sentence_transformers import SentenceTransformer

    texts = {k: v for k, v in titles.items() if k not in ABSENT | EMPTY}
    model = SentenceTransformer(minilm_path, device="cpu")
    vectors = model.encode(list(texts.values()), convert_to_numpy=True)
    return dict(zip(texts, vectors))


# -- the README's one-line reads ----------------------------------------------------------
# Each returns (ids in the order read, {id: vector or None}, element dtype of the vectors).
Read = tuple[list[str], dict[str, "np.ndarray | None"], np.dtype]


def _from_arrow(table: pa.Table) -> Read:
    ids = table.column("id").to_pylist()
    column = table.column(VECTOR).combine_chunks()
    vectors = {
        i: (None if not column[n].is_valid else column[n].values.to_numpy(zero_copy_only=False))
        for n, i in enumerate(ids)
    }
    return ids, vectors, np.dtype(column.type.value_type.to_pandas_dtype())


def read_pyarrow(out: Output) -> Read:
    OUT = out.path
    table = pq.read_table(OUT)
    return _from_arrow(table)


def read_pandas(out: Output) -> Read:
    import pandas as pd

    OUT = out.path
    df = pd.read_parquet(OUT)
    ids = df["id"].tolist()
    vectors = {i: (None if v is None else np.asarray(v)) for i, v in zip(ids, df[VECTOR])}
    dtypes = {v.dtype for v in vectors.values() if v is not None}
    assert len(dtypes) == 1, dtypes
    return ids, vectors, dtypes.pop()


def read_polars(out: Output) -> Read:
    import polars as pl

    OUT = out.path
    if out.vector_type == "list":
        df = pl.read_parquet(f"{OUT}/*.parquet").with_columns(pl.col("title_embedding").list.to_array(D))
    else:  # fixed_size_list: polars reads an Array(D) as it is
        df = pl.read_parquet(f"{OUT}/*.parquet")
    dtype = df.schema[VECTOR]
    assert isinstance(dtype, pl.Array) and dtype.size == D, dtype
    numpy_dtype = {pl.Float32: np.float32, pl.Float16: np.float16}[dtype.inner]
    ids = df["id"].to_list()
    vectors = {i: (None if v is None else np.asarray(v, dtype=numpy_dtype)) for i, v in zip(ids, df[VECTOR].to_list())}
    return ids, vectors, np.dtype(numpy_dtype)


def read_polars_cast(out: Output) -> Read:
    """One polars line for both vector types: cast to Array(Float32, D) (float16 widens exactly)."""
    import polars as pl

    OUT = out.path
    df = pl.read_parquet(f"{OUT}/*.parquet").with_columns(pl.col("title_embedding").cast(pl.Array(pl.Float32, D)))
    assert df.schema[VECTOR] == pl.Array(pl.Float32, D)
    ids = df["id"].to_list()
    vectors = {i: (None if v is None else np.asarray(v, dtype=np.float32)) for i, v in zip(ids, df[VECTOR].to_list())}
    return ids, vectors, np.dtype(np.float32)


def read_ray(out: Output) -> Read:
    import ray

    OUT = out.path
    ds = ray.data.read_parquet(OUT)
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert ds.schema().base_schema.field(VECTOR).type == table.schema.field(VECTOR).type
    return _from_arrow(table)


def read_duckdb(out: Output) -> Read:
    import duckdb

    OUT = out.path
    rows = duckdb.sql(f"SELECT id, title_embedding::FLOAT[{D}] AS v FROM '{OUT}/*.parquet'").fetchall()
    ids = [r[0] for r in rows]
    # DuckDB has no half type: FLOAT[D] is float32 for every output (float16 widens exactly).
    vectors = {i: (None if v is None else np.asarray(v, dtype=np.float32)) for i, v in rows}
    return ids, vectors, np.dtype(np.float32)


WIDENS_TO_FLOAT32 = {"polars_cast", "duckdb"}
READERS: dict[str, Callable[[Output], Read]] = {
    "pyarrow": read_pyarrow,
    "pandas": read_pandas,
    "polars": read_polars,
    "polars_cast": read_polars_cast,
    "ray": read_ray,
    "duckdb": read_duckdb,
}


@pytest.mark.parametrize("reader", list(READERS))
def test_reader_sees_every_id_once_same_vectors_and_nulls(output, reader, titles):
    ids, vectors, dtype = READERS[reader](output)

    assert sorted(ids) == sorted(titles), "every input id exactly once"
    null_ids = {i for i, v in vectors.items() if v is None}
    assert null_ids == ABSENT | EMPTY

    expected_dtype = np.dtype(np.float32) if reader in WIDENS_TO_FLOAT32 else output.np_dtype
    assert dtype == expected_dtype
    for i, v in vectors.items():
        if v is not None:
            assert v.shape == (D,), (i, v.shape)
            assert v.dtype == expected_dtype
            assert np.isfinite(v).all()

    _, base, _ = read_pyarrow(output)
    for i, v in vectors.items():
        if v is not None:
            np.testing.assert_array_equal(v, base[i].astype(expected_dtype), err_msg=f"{reader}: {i}")


def test_arrow_types_errors_and_ids(output, titles):
    table = pq.read_table(output.path)
    value = pa.float16() if output.dtype == "float16" else pa.float32()
    expected = pa.list_(value, D) if output.vector_type == "fixed_size_list" else pa.list_(value)
    assert table.schema.field(VECTOR).type == expected
    assert table.schema.field("id").type == pa.string() and not table.schema.field("id").nullable
    assert table.schema.names == ["id", "title", VECTOR, ERROR]
    rows = {r["id"]: r for r in table.to_pylist()}
    for i, title in titles.items():
        error = rows[i][ERROR]
        if i in EMPTY:
            assert error is not None and error.startswith("empty_text: "), (i, error)
        else:
            assert error is None, (i, error)
        assert rows[i]["title"] == title


def test_duckdb_cosine_similarity(output):
    import duckdb

    OUT = output.path

    def ranked(query_id: str) -> list[tuple[str, float]]:
        return duckdb.sql(
            f"SELECT id, array_cosine_similarity(title_embedding::FLOAT[{D}], "
            f"(SELECT title_embedding::FLOAT[{D}] FROM '{OUT}/*.parquet' WHERE id = '{query_id}')) AS sim "
            f"FROM '{OUT}/*.parquet' ORDER BY sim DESC NULLS LAST"
        ).fetchall()

    hits = ranked(NEAR_DUP_ID)
    assert hits[0][0] == NEAR_DUP_ID and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert hits[1][0] == ORIGINAL_ID, hits[:3]
    assert hits[1][1] > 0.8
    assert {i for i, sim in hits if sim is None} == ABSENT | EMPTY
    for query in (ORIGINAL_ID, "doc-0"):
        assert dict(ranked(query))[query] == pytest.approx(1.0, abs=1e-5)


def _is_local_path(value: Any) -> bool:
    text = str(value)
    return text.startswith(("/", ".", "~", "local:")) or "site-packages" in text


def test_parquet_metadata(output, minilm_path):
    part_files = sorted(Path(output.path).glob("*.parquet"))
    assert part_files
    metas = [pq.read_schema(p).metadata for p in part_files] + [pq.read_table(output.path).schema.metadata]
    for meta in metas:
        assert meta is not None and b"omniembed" in meta
        assert meta[b"omniembed"] == metas[0][b"omniembed"]
    data = json.loads(metas[0][b"omniembed"])
    assert data["version"]
    assert set(data["encoders"]) == {"title"}
    entry = data["encoders"]["title"]
    for name in OUTPUT_FIELDS:
        assert name in entry, name
    assert entry["model"] == MINILM_ID
    assert entry["family"]
    assert entry["revision"]
    assert len(entry["weights_sha256"]) == 64 and int(entry["weights_sha256"], 16) >= 0
    assert entry["dim"] == D
    assert entry["dtype"] == output.dtype
    assert entry["pooling"] == "mean"
    assert entry["normalize"] is True
    assert entry["max_length"] == 256
    assert entry["device"] == "cpu"
    assert entry["precision"]
    blob = metas[0][b"omniembed"].decode()
    assert minilm_path not in blob and os.path.dirname(minilm_path) not in blob
    for name in ("model", "revision"):
        assert not _is_local_path(entry[name]), (name, entry[name])


def test_manifest(output, titles):
    folder = Path(output.path)
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest == json.loads(json.dumps(output.manifest, default=str)), "run() returns the manifest on disk"
    assert manifest["status"] == "complete"
    schema_meta = json.loads(pq.read_schema(next(folder.glob("*.parquet"))).metadata[b"omniembed"])
    assert manifest["encoders"] == schema_meta["encoders"]

    config = manifest["config"]
    assert config["output"]["path"] == output.path
    assert config["output"]["vector_type"] == output.vector_type
    assert config["output"]["dtype"] == output.dtype
    assert config["sources"][0]["path"] == output.config["sources"][0]["path"]
    assert config["encoders"][0]["model"] == MINILM_ID

    assert manifest["rows"] == len(titles)
    assert manifest["input_rows"] == len(titles)
    assert manifest["rows_with_errors"] == len(EMPTY)
    assert manifest["errors"] == {"empty_text": len(EMPTY)}
    timing = manifest["timing"]
    assert timing["started"] and timing["finished"] and timing["seconds"] > 0

    committed = [f["name"] for f in manifest["files"]]
    assert len(committed) == len(set(committed))
    on_disk = sorted(p.name for p in folder.glob("*.parquet"))
    assert sorted(committed) == on_disk
    assert len(on_disk) >= 2, "rows_per_file should give several part files"
    assert sum(f["rows"] for f in manifest["files"]) == len(titles)
    assert sum(pq.ParquetFile(folder / n).metadata.num_rows for n in on_disk) == len(titles)


def test_no_staging_leftovers(output):
    folder = Path(output.path)
    committed = {f["name"] for f in output.manifest["files"]}
    assert sorted(p.name for p in folder.iterdir()) == sorted(committed | {"_manifest.json"})
    assert all(p.is_file() for p in folder.iterdir())
    assert not (folder.parent / f".{folder.name}.omniembed-staging").exists()
    assert not [p for p in folder.parent.iterdir() if "staging" in p.name]


def test_vectors_equal_sentence_transformers(output, reference):
    _, vectors, _ = read_pyarrow(output)
    for i, expected in reference.items():
        got = vectors[i].astype(np.float64)
        cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
        assert cosine >= 0.9999, (i, cosine)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=2e-3)  # normalize: true
