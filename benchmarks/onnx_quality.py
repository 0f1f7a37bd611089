"""The int8 retrieval-quality gate for hf-text ``backend: onnx, quantize: int8``.

A labelled set built offline from examples/data/docstring_pairs.jsonl: each pair's `anchor` (a
docstring's summary line) is a query and its `positive` (the docstring's body) its one relevant
passage. Queries and passages are embedded through the hf-text family (build_spec, prepare, the
encoder: the pipeline's own code path) with bundled MiniLM three ways: torch fp32, ONNX fp32,
ONNX int8. Printed for each: recall@10 (the query's passage among its 10 nearest passages by
cosine), rows/s of the encoder call (forward, pooling, normalize; tokenizing is not timed), the
min cosine of its vectors to torch fp32's, and the one-time load (export, quantize) seconds.
PASS when int8's recall@10 is within 0.01 (absolute) of torch fp32's; FAIL exits 1.

    python benchmarks/onnx_quality.py [--pairs 2826] [--threads N] [--model ID_OR_FOLDER]
    python benchmarks/onnx_quality.py --pairs 300     # smoke test

Exports are cached in $OMNIEMBED_CACHE/onnx (default ~/.cache/omniembed/onnx).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from encoders import FAMILIES, resolve_weights  # noqa: E402
from encoders.core.fidelity import min_cosine  # noqa: E402
from encoders.core.spec import SpecRequest  # noqa: E402

PAIRS = REPO / "examples" / "data" / "docstring_pairs.jsonl"
VARIANTS = {
    "torch fp32": {"precision": "fp32"},
    "onnx fp32": {"backend": "onnx"},
    "onnx int8": {"backend": "onnx", "quantize": "int8"},
}
GATE = 0.01  # int8's recall@10 may trail fp32's by this much, absolute
K = 10


@dataclass
class Result:
    queries: np.ndarray  # (n, d)
    passages: np.ndarray  # (n, d)
    rows_per_s: float
    load_s: float


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def load_pairs(limit: int | None) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()][:limit]
    return [r["anchor"] for r in rows], [r["positive"] for r in rows]


def run_variant(model: str, options: dict, queries: list[str], passages: list[str], max_tokens: int) -> Result:
    family = FAMILIES.get("hf-text")
    spec = family.build_spec(SpecRequest("text", {"text": "text"}, resolve_weights(model), options))
    start = time.perf_counter()
    encoder = family.load(spec, torch.device("cpu"))
    load_s = time.perf_counter() - start
    prepared = [family.prepare(spec, "text", pa.array(texts)).values for texts in (queries, passages)]
    encoder("text", prepared[0][:8], max_tokens=max_tokens)  # warm-up
    vectors, elapsed = [], 0.0
    for values in prepared:
        start = time.perf_counter()
        result = encoder("text", values, max_tokens=max_tokens)
        elapsed += time.perf_counter() - start
        assert result.valid.all(), "every docstring should embed"
        vectors.append(result.vectors)
    return Result(vectors[0], vectors[1], (len(queries) + len(passages)) / elapsed, load_s)


def recall_at_k(queries: np.ndarray, passages: np.ndarray, k: int = K) -> float:
    """The share of queries whose own passage (same index) is among their k nearest by cosine."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    p = passages / np.linalg.norm(passages, axis=1, keepdims=True)
    sims = q @ p.T  # (n, n)
    own = np.diag(sims)
    rank = (sims > own[:, None]).sum(1)  # passages strictly nearer than the right one
    return float((rank < k).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=None, help="use the first N pairs (default: all)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ORT threads")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--max-tokens", type=int, default=8192, help="token budget per micro-batch")
    args = parser.parse_args(argv)

    print(f"uptime at start: {uptime()}")
    torch.set_num_threads(args.threads)  # ORT sessions take the same count at load
    queries, passages = load_pairs(args.pairs)
    print(f"{len(queries)} query/passage pairs, {args.model}, {args.threads} threads")
    results = {
        name: run_variant(args.model, opts, queries, passages, args.max_tokens) for name, opts in VARIANTS.items()
    }

    reference = results["torch fp32"]
    recall = {name: recall_at_k(r.queries, r.passages) for name, r in results.items()}
    print(f"\n{'variant':<12} {'recall@10':>9} {'rows/s':>8} {'min cos':>9} {'load s':>7}")
    for name, r in results.items():
        cos = min_cosine(np.vstack([r.queries, r.passages]), np.vstack([reference.queries, reference.passages]))
        print(f"{name:<12} {recall[name]:>9.4f} {r.rows_per_s:>8.1f} {cos:>9.5f} {r.load_s:>7.1f}")
    drop = recall["torch fp32"] - recall["onnx int8"]
    verdict = "PASS" if drop <= GATE + 1e-9 else "FAIL"  # exactly 0.01 passes: recalls are multiples of 1/n
    int8, fp32 = recall["onnx int8"], recall["torch fp32"]
    print(f"\nint8 recall@10 {int8:.4f} vs fp32 {fp32:.4f} (drop {drop:+.4f}, gate {GATE}): {verdict}")
    print(f"uptime at end:   {uptime()}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
