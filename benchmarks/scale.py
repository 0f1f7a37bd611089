"""Driver scale: peak RSS and wall time of ``--dry-run`` planning on large synthetic inputs.

A dry run plans the whole job on the driver (listings and Parquet footers in tasks, the duplicate
pass, resume accounting) and prints one JSON line with the driver's own peak RSS. This runs it in
a fresh process (`python -m pipeline.cli run CFG.yaml --dry-run`) on:
  tables  synthetic Parquet datasets (--sizes, default 1M,10M,30M rows; 50,000 rows a file, so
          20/200/600 files; ids `id00000000123`, a short `text` column)
  folder  a folder of tiny .txt files (--files, default 200,000) as a `kind: text` source
each in two states: `fresh` (no output) and `half` (an output where every other read chunk is
committed whole and one more chunk partly, in manifest records and commit-log segments, as a
killed run leaves it; parts of 2048 rows, the CPU default). Each dry run's counts are checked
against what was fabricated (`committed`, `to_embed`, `chunks_to_read`); a wrong count stops the
script. Wall times include the process's fixed cost (Python, imports, Ray's start and stop).
Target: driver peak RSS at the largest size <= 1.25 x its figure at the smallest + 64 MB (30M
against 1M), per state; time about linear in rows (see benchmarks/README.md).

    python benchmarks/scale.py [--sizes 1M,10M,30M] [--files 200000] [--cache /tmp/omniembed-scale]
                               [--trust] [--repeat 1] [--json results.json]
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ROWS_PER_FILE = 50_000
FILES_PER_FOLDER = 1000  # the .txt files sit in subfolders of this many
PART_ROWS = 2048  # rows per committed part: the CPU default of output.rows_per_file
LOG_RECORDS = 500  # commit-log records per fabricated segment
RSS_FACTOR, RSS_SLACK_MB = 1.25, 64.0
WORDS = "the a an and of to in is it on for with red blue green shoe mug cup coffee tea cat dog ray data".split()
COMPLETE = "_complete"  # marker in a generated dataset (names with _ are not listed as input)


def parse_count(text: str) -> int:
    text = text.strip()
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def label(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


# --- inputs ------------------------------------------------------------------------------


def ids_array(start: int, stop: int) -> pa.Array:
    """`id` + 11 digits of the row number, built as one buffer (no Python loop per row)."""
    n = stop - start
    digits = (np.arange(start, stop, dtype=np.int64)[:, None] // 10 ** np.arange(10, -1, -1)) % 10 + ord("0")
    data = np.empty((n, 13), np.uint8)
    data[:, 0], data[:, 1], data[:, 2:] = ord("i"), ord("d"), digits
    offsets = np.arange(0, 13 * (n + 1), 13, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())])


def sentences(rng: np.random.Generator, count: int = 256) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(count)]


def make_tables(folder: Path, rows: int) -> None:
    marker = folder / COMPLETE
    if marker.exists() and marker.read_text() == str(rows):
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(rows)
    pool = pa.array(sentences(rng))
    started = time.perf_counter()
    for f, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        stop = min(rows, start + ROWS_PER_FILE)
        text = pool.take(pa.array(rng.integers(0, len(pool), stop - start)))
        pq.write_table(pa.table({"id": ids_array(start, stop), "text": text}), folder / f"part-{f:05d}.parquet")
    marker.write_text(str(rows))
    print(f"  wrote {folder} ({rows:,} rows) in {time.perf_counter() - started:.1f} s", flush=True)


def make_text_folder(folder: Path, files: int) -> None:
    marker = folder / COMPLETE
    if marker.exists() and marker.read_text() == str(files):
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(files)
    pool = [s.encode() + b"\n" for s in sentences(rng)]
    picks = rng.integers(0, len(pool), files)
    started = time.perf_counter()
    for i in range(files):
        sub = folder / f"d{i // FILES_PER_FOLDER:04d}"
        if i % FILES_PER_FOLDER == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i:07d}.txt").write_bytes(pool[picks[i]])
    marker.write_text(str(files))
    print(f"  wrote {folder} ({files:,} files) in {time.perf_counter() - started:.1f} s", flush=True)


def make_model(folder: Path) -> None:
    """A tiny BERT (as tests/conftest.py's tiny_bert): planning loads its config, never its forward."""
    if (folder / "model.safetensors").exists():
        return
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters]))
    vocab += [f"##{c}" for c in letters] + [".", ",", "!", "?"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    layers = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
    config = BertConfig(vocab_size=len(vocab), **layers, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)


# --- configs, fingerprints and a half-committed output ------------------------------------


def config_dict(source: dict[str, Any], model: Path, output: Path, policy: str) -> dict[str, Any]:
    """What `omniembed embed SRC --id-column id --text-column text --text-model M` builds."""
    return {
        "sources": [source],
        "encoders": [{"output": "text", "column": "text", "model": str(model)}],
        "output": {"path": str(output), "on_duplicate_id": policy},
    }


def fingerprints(configs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(fingerprint, encoders metadata) per config, as pipeline.graph.run computes them."""
    from pipeline.cluster import cluster_shape
    from pipeline.plan import as_config, encoders_metadata, plan
    from pipeline.ray_env import init_ray, shutdown_ray
    from pipeline.sink import fingerprint

    init_ray()
    try:
        out = []
        for data in configs:
            config = as_config(data)
            meta = encoders_metadata(plan(config, cluster_shape()), config)
            out.append((fingerprint(config, meta), meta))
        return out
    finally:
        shutdown_ray()


def fabricate_half(data: dict[str, Any], fp: str, meta: dict[str, Any]) -> dict[str, int]:
    """Commit every other read chunk whole and the first odd one partly; return the expected report."""
    from pipeline.chunks import plan_sources
    from pipeline.commits import COMMITS, new_run_id
    from pipeline.plan import as_config
    from pipeline.sink import FORMAT_VERSION, MANIFEST, part_name
    from pipeline.sources import ReadChunk, read_chunk
    from pipeline.tasks import LocalTasks

    config = as_config(data)
    out = Path(config.output.path)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    chunks = plan_sources(config.sources, LocalTasks()).chunks
    keys, rows = chunks.column("key").to_pylist(), chunks.column("rows").to_numpy()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), sink)
    placeholder = sink.getvalue().to_pybytes()  # a done chunk's parts are only listed, never read

    def record(name: str, key: str, n: int) -> dict[str, Any]:
        return {"name": name, "rows": n, "rows_with_errors": 0, "errors": {}, "chunks": {key: n}}

    records, done = [], list(range(0, len(keys), 2))
    for i in done:
        for start in range(0, int(rows[i]), PART_ROWS):
            name = part_name([keys[i], str(start)])
            (out / name).write_bytes(placeholder)
            records.append(record(name, keys[i], min(PART_ROWS, int(rows[i]) - start)))
    partial = 0
    if len(keys) > 1 and rows[1] > 1:  # chunk 1: its first half, in parts that hold its real ids
        ids = read_chunk(ReadChunk.from_row(chunks.slice(1, 1).to_pylist()[0]), columns=[]).column("id")
        partial = int(rows[1]) // 2
        for start in range(0, partial, PART_ROWS):
            part = ids.slice(start, min(PART_ROWS, partial - start))
            name = part_name(part.to_pylist())
            pq.write_table(pa.table({"id": part}), out / name)
            records.append(record(name, keys[1], len(part)))
    in_log = records[len(records) * 2 // 3 :] or records[-1:]  # the tail since the last compaction
    in_manifest = records[: len(records) - len(in_log)]
    manifest = {
        "version": FORMAT_VERSION,
        "status": "running",
        "fingerprint": fp,
        "encoders": meta,
        "config": config.to_dict(),
        "files": in_manifest,
        "resumed_from": None,
        "commit_log": f"{COMMITS}/",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / COMMITS).mkdir()
    run_id = new_run_id()
    for seq, start in enumerate(range(0, len(in_log), LOG_RECORDS), 1):
        lines = [json.dumps(r, sort_keys=True) for r in in_log[start : start + LOG_RECORDS]]
        (out / COMMITS / f"{run_id}-{seq:06d}.jsonl").write_text("\n".join(lines) + "\n")
    total = int(rows.sum())
    committed = int(rows[done].sum()) + partial
    return {
        "rows": total,
        "duplicates": 0,
        "committed": committed,
        "to_embed": total - committed,
        "chunks": len(keys),
        "chunks_to_read": len(keys) - len(done),
    }


# --- the dry runs ------------------------------------------------------------------------


def dry_run(config_path: Path) -> tuple[float, dict[str, Any]]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config_path), "--dry-run"]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or len(lines) != 1:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"FAILED: {' '.join(command)}: exit {proc.returncode}, {len(lines)} stdout lines: {lines[:3]}")
    return wall, json.loads(lines[0])


def check(report: dict[str, Any], expected: dict[str, int], what: str) -> None:
    wrong = {k: (report.get(k), v) for k, v in expected.items() if report.get(k) != v}
    if wrong:
        raise SystemExit(f"FAILED: {what}: wrong counts (got, expected): {wrong}")


def find(results: list[dict[str, Any]], dataset: str, policy: str, state: str) -> dict[str, Any]:
    return next(r for r in results if (r["dataset"], r["policy"], r["state"]) == (dataset, policy, state))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M,30M", help="table sizes in rows (k/M suffixes)")
    parser.add_argument("--files", default="200000", help="text files in the folder source (0: none)")
    parser.add_argument("--cache", default="/tmp/omniembed-scale", help="inputs are built here once and reused")
    parser.add_argument("--trust", action="store_true", help="also time on_duplicate_id: trust (no duplicate pass)")
    parser.add_argument("--repeat", type=int, default=1, help="dry runs per case: the fastest wall, the highest RSS")
    parser.add_argument("--json", help="save the results here")
    args = parser.parse_args()
    sizes = sorted(parse_count(s) for s in args.sizes.split(",") if s.strip())
    files = parse_count(args.files)
    cache = Path(args.cache)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() or str(os.getloadavg())
    print(f"load: {load}", flush=True)

    print("inputs:", flush=True)
    model = cache / "tiny-bert"
    make_model(model)
    datasets = []  # (name, source config, rows)
    for rows in sizes:
        make_tables(cache / f"table-{label(rows)}", rows)
        datasets.append((f"table-{label(rows)}", {"path": str(cache / f"table-{label(rows)}"), "id_column": "id"}))
    if files:
        make_text_folder(cache / f"text-{label(files)}", files)
        datasets.append((f"text-{label(files)}", {"path": str(cache / f"text-{label(files)}"), "kind": "text"}))
    policies = ["error", "trust"] if args.trust else ["error"]
    (cache / "out").mkdir(parents=True, exist_ok=True)
    cases = []  # (dataset, policy, state, config)
    for name, source in datasets:
        for policy in policies:
            for state in ("fresh", "half"):
                out = cache / "out" / f"{name}-{policy}-{state}"
                shutil.rmtree(out, ignore_errors=True)
                cases.append((name, policy, state, config_dict(source, model, out, policy)))
    print("fingerprints (Ray in this process, then shut down) ...", flush=True)
    prints = fingerprints([c[3] for c in cases])

    results = []
    for (name, policy, state, data), (fp, meta) in zip(cases, prints):
        if state == "half":
            expected = fabricate_half(data, fp, meta)
        else:
            expected = {"committed": 0, "duplicates": 0}
        config_path = cache / "out" / f"{name}-{policy}-{state}.yaml"
        config_path.write_text(json.dumps(data, indent=2))  # JSON is YAML
        walls, rss = [], 0.0
        for _ in range(max(1, args.repeat)):
            wall, report = dry_run(config_path)
            check(report, expected, f"{name} {policy} {state}")
            if state == "fresh":
                check(report, {"to_embed": report["rows"], "chunks_to_read": report["chunks"]}, f"{name} fresh")
            walls.append(wall)
            rss = max(rss, float(report["driver_peak_rss_mb"]))
        result = {"dataset": name, "policy": policy, "state": state, **report, "wall_s": min(walls)}
        result["driver_peak_rss_mb"] = rss
        results.append(result)
        print(
            f"  {name} {policy} {state}: {min(walls):.1f} s, {rss:.0f} MB, {report['chunks']} chunks",
            f"({report['chunks_to_read']} to read), committed {report['committed']:,}",
            flush=True,
        )

    load_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() or str(os.getloadavg())
    print(f"\nload at the start: {load}\nload at the end:   {load_end}")
    print("| dataset | duplicates | state | rows | chunks | to read | wall s | rows/s planned | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['dataset']} | {r['policy']} | {r['state']} | {r['rows']:,} | {r['chunks']:,} | "
            f"{r['chunks_to_read']:,} | {r['wall_s']:.1f} | {r['rows'] / r['wall_s']:,.0f} | "
            f"{r['driver_peak_rss_mb']:.0f} |"
        )
    ratios, failed = [], False
    if len(sizes) > 1:
        small, big = f"table-{label(sizes[0])}", f"table-{label(sizes[-1])}"
        print(f"\n{big} against {small} ({sizes[-1] / sizes[0]:g}x the rows):")
        for policy in policies:
            for state in ("fresh", "half"):
                a, b = (find(results, dataset, policy, state) for dataset in (small, big))
                limit = RSS_FACTOR * a["driver_peak_rss_mb"] + RSS_SLACK_MB
                ok = b["driver_peak_rss_mb"] <= limit
                failed |= not ok
                # t = fixed + rows / rate through the two points; noise can make the slope meaningless
                extra = b["wall_s"] - a["wall_s"]
                rate = (b["rows"] - a["rows"]) / extra if extra > 0 else math.nan
                fixed = a["wall_s"] - a["rows"] / rate if extra > 0 else math.nan
                slope = (
                    f"marginal {rate:,.0f} rows/s, fixed cost {fixed:.1f} s" if extra > 0 else "marginal n/a (noise)"
                )
                ratios.append(
                    {
                        "policy": policy,
                        "state": state,
                        "rss_ratio": b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"],
                        "rss_limit_mb": limit,
                        "time_ratio": b["wall_s"] / a["wall_s"],
                        "rows_per_s_marginal": None if math.isnan(rate) else rate,
                        "fixed_s": None if math.isnan(fixed) else fixed,
                        "pass": ok,
                    }
                )
                print(
                    f"  {policy:5} {state:5}  RSS {b['driver_peak_rss_mb']:.0f}/{a['driver_peak_rss_mb']:.0f} MB = "
                    f"{ratios[-1]['rss_ratio']:.2f}x, {b['driver_peak_rss_mb'] - a['driver_peak_rss_mb']:+.0f} MB "
                    f"(limit {limit:.0f} MB: {'PASS' if ok else 'FAIL'})  "
                    f"time {b['wall_s']:.1f}/{a['wall_s']:.1f} s = {ratios[-1]['time_ratio']:.2f}x; "
                    f"{slope}"
                )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"load": load, "load_end": load_end, "results": results, "ratios": ratios}, indent=2)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
