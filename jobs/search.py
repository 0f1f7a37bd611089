"""``python -m jobs.search build|query``: exact and ANN (FAISS) search over one vector column.

    python -m jobs.search build out/items --column text_embedding            # -> out/items.index/
    python -m jobs.search query out/items --column text_embedding --text "send an e-mail" --show topic,text
    python -m jobs.search query out/photos --column clip_image_embedding --text "a cat"   # text -> image (CLIP)
    python -m jobs.search query out/products --column photo_embedding --image cat.jpg
    python -m jobs.search query out/items --column text_embedding --id stdlib-0042 --exact

The index lives in its own folder beside the dataset (``<dataset>.index/``), never inside it,
where Parquet readers would take it for data. ``build`` reports the ANN index's recall@k
against exact search on a sample of the dataset's own vectors (each query's own row left out).
Queries are embedded with the encoder the dataset's metadata names (jobs/query_encoding.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from jobs.ann import (
    ANN_KINDS,
    METRICS,
    AnnParams,
    ExactIndex,
    ann_search,
    build_ann,
    deserialize,
    neighbours_without_self,
    recall_at_k,
    resolve_metric,
    search_space,
    serialize,
)
from jobs.entrypoint import EXIT_OK, JobError, add_common_flags, job_parser, run_job
from jobs.summary import print_facts, print_table
from jobs.vectors import Dataset, VectorColumn, encoder_for_column, open_dataset, read_vectors
from pipeline.filesystems import join, open_filesystem

log = logging.getLogger(__name__)


def default_index_path(dataset: str) -> str:
    return dataset.rstrip("/") + ".index"


def check_outside(index_path: str, dataset: str) -> None:
    _, index_root = open_filesystem(index_path)
    _, data_root = open_filesystem(dataset)
    if (index_root.rstrip("/") + "/").startswith(data_root.rstrip("/") + "/"):
        raise JobError(
            f"--index {index_path!r} is inside the dataset folder {dataset!r}, where Parquet readers "
            f"would trip over it; put it beside the dataset (default {default_index_path(dataset)!r})"
        )


@dataclass
class BuiltIndex:
    info: dict[str, Any]
    index: Any
    ids: np.ndarray
    params: AnnParams = field(default_factory=AnnParams)


def build_index(
    dataset_path: str,
    column: str,
    index_path: str | None = None,
    metric: str = "auto",
    params: AnnParams = AnnParams(),
    recall_queries: int = 1000,
    k: int = 10,
    seed: int = 0,
) -> BuiltIndex:
    """Build, measure and save the ANN index of one column; returns it with its info."""
    from tqdm import tqdm

    params.validate()
    index_path = index_path or default_index_path(dataset_path)
    check_outside(index_path, dataset_path)
    column_data = read_vectors(dataset_path, column)
    if len(column_data.ids) == 0:
        raise JobError(
            f"column {column!r} of {dataset_path!r} has no vectors (all {column_data.total_rows} rows are null)"
        )
    metric = resolve_metric(metric, column_data.encoder.normalized)
    space = search_space(column_data.vectors, metric)
    started = time.perf_counter()
    index = build_ann(space, params)
    build_seconds = time.perf_counter() - started
    measured = measure_recall(space, index, params, k, recall_queries, seed, tqdm)
    info = {
        "dataset": dataset_path,
        "column": column,
        "metric": metric,
        "dim": column_data.dim,
        "vectors": len(column_data.ids),
        "nulls_skipped": column_data.nulls,
        "ann": params.as_dict(),
        "encoder": dict(column_data.encoder.meta),
        "dataset_files": column_data.dataset.fingerprint(),
        "build_seconds": build_seconds,
        **measured,
    }
    save_index(index_path, column, info, index, column_data.ids)
    info["index"] = index_path
    return BuiltIndex(info, index, column_data.ids, params)


def measure_recall(
    space: np.ndarray, index: Any, params: AnnParams, k: int, queries: int, seed: int, progress: Any
) -> dict[str, Any]:
    """ANN vs exact top-k on a sample of the indexed vectors, each query's own row left out."""
    n = len(space)
    k = min(k, n - 1)
    if k < 1:
        return {"recall_k": k, "recall": float("nan"), "recall_queries": 0}
    sample = np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)
    exact = ExactIndex(space)
    found, truth, exact_s, ann_s = [], [], 0.0, 0.0
    for start in progress(range(0, len(sample), 256), desc="recall vs exact", unit="batch", disable=None):
        rows = sample[start : start + 256]
        t0 = time.perf_counter()
        _, exact_rows = exact.search(space[rows], k + 1)
        t1 = time.perf_counter()
        _, ann_rows = ann_search(index, space[rows], k + 1, params)
        t2 = time.perf_counter()
        exact_s, ann_s = exact_s + t1 - t0, ann_s + t2 - t1
        truth.append(neighbours_without_self(exact_rows, rows, k))
        found.append(neighbours_without_self(ann_rows, rows, k))
    return {
        "recall_k": k,
        "recall": recall_at_k(np.concatenate(found), np.concatenate(truth)),
        "recall_queries": len(sample),
        "exact_ms_per_query": 1000 * exact_s / len(sample),
        "ann_ms_per_query": 1000 * ann_s / len(sample),
    }


def save_index(index_path: str, column: str, info: dict[str, Any], index: Any, ids: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = open_filesystem(index_path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(join(root, f"{column}.faiss")) as stream:
        stream.write(serialize(index))
    with fs.open_output_stream(join(root, f"{column}.ids.parquet")) as stream:
        pq.write_table(pa.table({"id": pa.array(ids.tolist(), pa.string())}), stream)
    with fs.open_output_stream(join(root, f"{column}.json")) as stream:  # last: its presence means complete
        stream.write(json.dumps(info, indent=2, default=str).encode())


def load_index(index_path: str, column: str, dataset: Dataset) -> BuiltIndex:
    import pyarrow.parquet as pq

    fs, root = open_filesystem(index_path)
    try:
        with fs.open_input_stream(join(root, f"{column}.json")) as stream:
            info = json.loads(stream.read())
    except FileNotFoundError:
        raise JobError(
            f"no index of column {column!r} in {index_path!r}; build it first: "
            f"python -m jobs.search build {dataset.path} --column {column}"
        ) from None
    if info["dataset_files"] != dataset.fingerprint():
        raise JobError(
            f"the index in {index_path!r} was built on other part files than {dataset.path!r} now holds; "
            f"rebuild it: python -m jobs.search build {dataset.path} --column {column}"
        )
    with fs.open_input_stream(join(root, f"{column}.faiss")) as stream:
        index = deserialize(stream.read())
    with fs.open_input_file(join(root, f"{column}.ids.parquet")) as handle:
        ids = np.asarray(pq.read_table(handle).column("id").to_pylist(), dtype=object)
    return BuiltIndex(info, index, ids, AnnParams(**info["ann"]))


@dataclass
class Query:
    text: str | None = None
    image: str | None = None
    id: str | None = None

    def describe(self) -> str:
        return (
            f"text {self.text!r}"
            if self.text is not None
            else f"image {self.image!r}"
            if self.image
            else f"id {self.id!r}"
        )


def query_vector(
    dataset: Dataset, column: str, query: Query, metric: str, model: str | None, vectors: VectorColumn | None
) -> np.ndarray:
    """The query in the column's search space: (1, D). An id query takes that row's vector."""
    if query.id is not None:
        assert vectors is not None
        return search_space(vectors.vectors[vectors.row_of(query.id)][None], metric)
    from jobs.query_encoding import query_encoder

    entry = encoder_for_column(dataset, column)
    encoder = query_encoder(dataset, entry, model)
    modality, value = ("text", query.text) if query.text is not None else ("image", query.image)
    encoder.check_modality(modality)
    if modality == "image":
        from pathlib import Path

        if "://" not in str(value) and not Path(str(value)).expanduser().is_file():
            raise JobError(f"--image {value!r} does not exist")
    return search_space(encoder.encode(modality, [value]), metric)


def run_query(
    dataset_path: str,
    column: str,
    query: Query,
    k: int = 10,
    exact: bool = False,
    index_path: str | None = None,
    metric: str = "auto",
    model: str | None = None,
    show: Sequence[str] = (),
    ef_search: int | None = None,
) -> list[dict[str, Any]]:
    """Top-k results as rows {rank, id, score, *show}; the query's own id is left out."""
    dataset = open_dataset(dataset_path)
    entry = encoder_for_column(dataset, column)
    vectors: VectorColumn | None = None
    built: BuiltIndex | None = None
    if exact:
        vectors = read_vectors(dataset, column)
        metric = resolve_metric(metric, entry.normalized)
    else:
        built = load_index(index_path or default_index_path(dataset_path), column, dataset)
        metric = built.info["metric"]
        if query.id is not None:
            vectors = read_vectors(dataset, column)
    q = query_vector(dataset, column, query, metric, model, vectors)
    extra = 1 if query.id is not None else 0
    if exact:
        assert vectors is not None
        scores, rows = ExactIndex(search_space(vectors.vectors, metric)).search(q, k + extra)
        ids = vectors.ids
    else:
        assert built is not None
        params = built.params if ef_search is None else AnnParams(**{**built.params.as_dict(), "ef_search": ef_search})
        scores, rows = ann_search(built.index, q, k + extra, params)
        ids = built.ids
    results = [(ids[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0 and ids[r] != query.id][:k]
    shown = _shown_columns(dataset, show, [i for i, _ in results])
    return [
        {"rank": rank, "id": id_, "score": score, **{c: shown[c].get(id_) for c in show}}
        for rank, (id_, score) in enumerate(results, 1)
    ]


def _shown_columns(dataset: Dataset, show: Sequence[str], ids: list[str]) -> dict[str, dict[str, Any]]:
    if not show:
        return {}
    table = dataset.read(["id", *show])
    wanted = set(ids)
    out: dict[str, dict[str, Any]] = {c: {} for c in show}
    for row in table.to_pylist():
        if row["id"] in wanted:
            for c in show:
                out[c][row["id"]] = row[c]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("jobs.search", __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,query}")
    build = sub.add_parser(
        "build",
        help="build the ANN index of a vector column and report its recall@k",
        description="Build a FAISS index of one vector column in <dataset>.index/ and report "
        "its recall@k against exact search.",
    )
    build.add_argument("dataset", help="omniembed output folder (or URI)")
    build.add_argument("--column", required=True, help="vector column, e.g. text_embedding or clip_image_embedding")
    build.add_argument("--index", help="index folder (default: <dataset>.index, beside the dataset)")
    build.add_argument(
        "--metric",
        choices=METRICS,
        default="auto",
        help="auto (default): inner product for vectors the encoder normalized, else cosine",
    )
    build.add_argument("--ann", choices=ANN_KINDS, default="hnsw", help="FAISS index type (default hnsw)")
    build.add_argument("--m", type=int, default=32, help="HNSW graph degree (default 32)")
    build.add_argument("--ef-construction", type=int, default=200, help="HNSW build beam (default 200)")
    build.add_argument("--ef-search", type=int, default=128, help="HNSW query beam, saved with the index (default 128)")
    build.add_argument("--nlist", type=int, help="IVF lists (default about 4*sqrt(n))")
    build.add_argument("--nprobe", type=int, default=64, help="IVF lists searched per query (default 64)")
    build.add_argument("-k", type=int, default=10, help="k of the reported recall@k (default 10)")
    build.add_argument("--recall-queries", type=int, default=1000, help="sampled queries for recall@k (default 1000)")
    build.add_argument("--seed", type=int, default=0, help="seed of the recall sample")
    add_common_flags(build)

    query = sub.add_parser(
        "query",
        help="top-k neighbours of a text, an image or an id",
        description="Top-k neighbours of a query, embedded with the encoder the metadata names.",
    )
    query.add_argument("dataset", help="omniembed output folder (or URI)")
    query.add_argument("--column", required=True, help="vector column to search")
    given = query.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="a text query (a CLIP image column is searched with CLIP's text tower)")
    given.add_argument("--image", help="an image file or URI")
    given.add_argument("--id", help="the vector of this row of the dataset")
    query.add_argument("-k", type=int, default=10, help="results (default 10)")
    query.add_argument(
        "--exact", action="store_true", help="brute-force search instead of the ANN index (needs no index)"
    )
    query.add_argument("--index", help="index folder (default: <dataset>.index)")
    query.add_argument("--metric", choices=METRICS, default="auto", help="with --exact: as for build")
    query.add_argument("--ef-search", type=int, help="HNSW query beam (default: the one saved with the index)")
    query.add_argument("--model", help="model folder, for datasets embedded with a local model (local:<name>)")
    query.add_argument("--show", default="", help="comma-separated dataset columns to print beside each hit")
    query.add_argument("--json", action="store_true", help="print the results as one JSON object instead of a table")
    add_common_flags(query)
    return parser


def _body(args: argparse.Namespace) -> int:
    if args.command == "build":
        built = build_index(
            args.dataset,
            args.column,
            args.index,
            args.metric,
            AnnParams(args.ann, args.m, args.ef_construction, args.ef_search, args.nlist, args.nprobe),
            args.recall_queries,
            args.k,
            args.seed,
        )
        info = built.info
        print_facts(
            "jobs.search build",
            [
                ("dataset", info["dataset"]),
                ("column", info["column"]),
                ("index", info["index"]),
                ("vectors", info["vectors"]),
                ("null rows skipped", info["nulls_skipped"]),
                ("dim", info["dim"]),
                ("metric", info["metric"]),
                ("ann", _describe(built.params)),
                ("build seconds", round(info["build_seconds"], 2)),
                (f"recall@{info['recall_k']} vs exact", info["recall"]),
                ("recall queries", info["recall_queries"]),
                ("exact ms/query", round(info.get("exact_ms_per_query", 0.0), 3)),
                ("ann ms/query", round(info.get("ann_ms_per_query", 0.0), 3)),
            ],
        )
        return EXIT_OK
    show = [c for c in args.show.split(",") if c]
    query = Query(args.text, args.image, args.id)
    started = time.perf_counter()
    results = run_query(
        args.dataset, args.column, query, args.k, args.exact, args.index, args.metric, args.model, show, args.ef_search
    )
    seconds = time.perf_counter() - started
    if args.json:
        json.dump({"query": query.describe(), "exact": args.exact, "results": results}, sys.stdout, default=str)
        print()
        return EXIT_OK
    rows = [[r["rank"], r["id"], r["score"], *[_short(r[c]) for c in show]] for r in results]
    print_table(
        f"jobs.search: {query.describe()} in {args.column} ({'exact' if args.exact else 'ann'}, "
        f"{len(results)} results, {seconds:.2f}s)",
        ["rank", "id", "score", *show],
        rows,
    )
    return EXIT_OK


def _describe(params: AnnParams) -> str:
    if params.kind == "hnsw":
        return f"faiss hnsw (M={params.m}, efConstruction={params.ef_construction}, efSearch={params.ef_search})"
    return f"faiss ivf-flat (nlist={params.nlist or 'auto'}, nprobe={params.nprobe})"


def _short(value: Any, width: int = 80) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    return run_job("jobs.search", build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
