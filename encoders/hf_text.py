"""Hugging Face text encoders (``AutoModel``), with sentence-transformers folder settings.

Prepare (CPU task): text -> token id chunks. Encode (actor): dynamic padding, forward,
pooling, chunk pooling, L2 normalization. The vectors equal sentence-transformers' ``encode``
for the same folder: same max_seq_length, pooling, Normalize, prompts and lowercasing.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from encoders.batching import plan_micro_batches
from encoders.device import autocast, resolve_precision
from encoders.errors import error_value
from encoders.pooling import POOLING_MODES, check_pooling, pool_tokens
from encoders.probe import spec_with_dim
from encoders.registry import FAMILIES
from encoders.spec import EncoderSpec, Prepared, validate_options
from encoders.weights import ResolvedWeights

LONG_TEXT_MODES = ("truncate", "chunk")
TOKENS_TYPE = pa.list_(pa.list_(pa.int32()))  # per row: one token id list per chunk

# Option name -> (type, default). A default of None is filled from the model folder.
TEXT_OPTIONS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "pooling": (str, None),
    "normalize": (bool, None),
    "max_length": (int, None),
    "prefix": (str, None),
    "prompt_name": (str, None),
    "lowercase": (bool, None),
    "long_text": (str, "truncate"),
    "chunk_overlap": (int, 32),
    "max_chunks": (int, 8),
    "max_chars": (int, 16_000_000),
    "precision": (str, "auto"),
    "trust_remote_code": (bool, False),
}


@dataclass(frozen=True)
class FolderSettings:
    """What a sentence-transformers folder declares; plain HF folders give the defaults."""

    model_dir: str
    max_length: int | None
    pooling: str | None
    normalize: bool
    lowercase: bool
    prompts: Mapping[str, str]
    default_prompt_name: str | None


_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


@functools.lru_cache(maxsize=16)
def read_folder_settings(path: str) -> FolderSettings:
    root = Path(path)
    modules = _read_json(root / "modules.json") or []
    model_dir, pooling, normalize = root, None, False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith(".Transformer"):
            model_dir = root / module.get("path", "")
        elif kind.endswith(".Pooling"):
            pooling = _pooling_from_st(_read_json(root / module.get("path", "") / "config.json") or {})
        elif kind.endswith(".Normalize"):
            normalize = True
    st_config = _read_json(model_dir / "sentence_bert_config.json") or _read_json(root / "sentence_bert_config.json") or {}
    st_meta = _read_json(root / "config_sentence_transformers.json") or {}
    return FolderSettings(
        model_dir=str(model_dir),
        max_length=st_config.get("max_seq_length"),
        pooling=pooling,
        normalize=normalize,
        lowercase=bool(st_config.get("do_lower_case", False)),
        prompts=dict(st_meta.get("prompts") or {}),
        default_prompt_name=st_meta.get("default_prompt_name"),
    )


def _pooling_from_st(config: Mapping[str, Any]) -> str | None:
    if config.get("include_prompt") is False:
        raise ValueError("the folder's pooling excludes prompt tokens (include_prompt: false), which omniembed does not support")
    modes = [mode for key, mode in _ST_POOLING_KEYS.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _ST_POOLING_KEYS]
    if others or len(modes) > 1:
        raise ValueError(f"the folder's pooling {others or modes} is not supported; set pooling: to one of {', '.join(POOLING_MODES)}")
    return modes[0] if modes else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_dir: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise ValueError(f"model {Path(model_dir).name!r} has no fast tokenizer")
    return tokenizer


class HFTextFamily:
    name = "hf-text"
    modalities = ("text",)

    def build_spec(self, output: str, columns: Mapping[str, str], weights: ResolvedWeights,
                   options: Mapping[str, Any], dim: int | None) -> EncoderSpec:
        from encoders.weights import weights_sha256

        folder = read_folder_settings(weights.path)
        opts = validate_options(options, TEXT_OPTIONS, self.name)
        tokenizer = load_tokenizer(folder.model_dir, opts["trust_remote_code"])
        if opts["pooling"] is None:
            opts["pooling"] = folder.pooling or "mean"
        check_pooling(opts["pooling"])
        if opts["normalize"] is None:
            opts["normalize"] = folder.normalize
        if opts["lowercase"] is None:
            opts["lowercase"] = folder.lowercase
        limit = _model_max_length(folder.model_dir, tokenizer)
        if opts["max_length"] is None:
            opts["max_length"] = min(folder.max_length or limit, limit)
        if not 2 < opts["max_length"] <= limit:
            raise ValueError(f"max_length {opts['max_length']} is out of range; the model takes 3 to {limit} tokens")
        opts["prefix"] = _resolve_prefix(opts.pop("prefix"), opts.pop("prompt_name"), folder)
        if opts["long_text"] not in LONG_TEXT_MODES:
            raise ValueError(f"long_text {opts['long_text']!r} is not valid; valid values: {', '.join(LONG_TEXT_MODES)}")
        if opts["long_text"] == "chunk" and not 0 <= opts["chunk_overlap"] < opts["max_length"] // 2:
            raise ValueError(f"chunk_overlap must be between 0 and half of max_length ({opts['max_length']})")
        if opts["max_chunks"] < 1:
            raise ValueError("max_chunks must be >= 1")
        resolve_precision(torch.device("cpu"), opts["precision"])  # validates the name
        sha = weights_sha256(folder.model_dir)
        return spec_with_dim(self, output, columns, weights, sha, opts, dim, pooling=opts["pooling"])

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        folder = read_folder_settings(spec.weights.path)
        tokenizer = load_tokenizer(folder.model_dir, spec.options["trust_remote_code"])
        return tokenize_texts(tokenizer, values.to_pylist(), spec.options)

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFTextEncoder":
        return HFTextEncoder(spec, device)


def _model_max_length(model_dir: str, tokenizer: Any) -> int:
    from transformers import AutoConfig

    candidates = [getattr(tokenizer, "model_max_length", None)]
    try:
        candidates.append(getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None))
    except (OSError, ValueError):
        pass
    usable = [c for c in candidates if isinstance(c, int) and 0 < c < 1_000_000]
    return min(usable) if usable else 512


def _resolve_prefix(prefix: str | None, prompt_name: str | None, folder: FolderSettings) -> str:
    if prefix is not None and prompt_name is not None:
        raise ValueError("give either prefix or prompt_name, not both")
    if prompt_name is not None:
        if prompt_name not in folder.prompts:
            raise ValueError(f"prompt_name {prompt_name!r} is not declared by the model; declared: {', '.join(folder.prompts) or '(none)'}")
        return folder.prompts[prompt_name]
    if prefix is not None:
        return prefix
    if folder.default_prompt_name:
        return folder.prompts.get(folder.default_prompt_name, "")
    return ""


def tokenize_texts(tokenizer: Any, values: list[Any], options: Mapping[str, Any]) -> Prepared:
    """Values -> per row the token id chunks (null when absent or bad) and error values."""
    errors: list[str | None] = [None] * len(values)
    texts: list[str] = []
    rows: list[int] = []
    for i, value in enumerate(values):
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                errors[i] = error_value("decode_failed", f"invalid UTF-8 at byte {exc.start}")
                continue
        if not isinstance(value, str):
            errors[i] = error_value("bad_type", f"expected text, got {type(value).__name__}")
            continue
        if not value.strip():
            errors[i] = error_value("empty_text", "text is empty or whitespace only")
            continue
        if len(value) > options["max_chars"]:
            errors[i] = error_value("too_large", f"{len(value)} characters, limit max_chars={options['max_chars']}")
            continue
        texts.append(value.lower() if options["lowercase"] else value)
        rows.append(i)
    chunks: list[list[list[int]] | None] = [None] * len(values)
    if texts:
        for row, row_chunks in zip(rows, _token_chunks(tokenizer, texts, options)):
            chunks[row] = row_chunks
    return Prepared(pa.array(chunks, type=TOKENS_TYPE), errors)


def _token_chunks(tokenizer: Any, texts: list[str], options: Mapping[str, Any]) -> list[list[list[int]]]:
    """Truncate: the prompt and text as sentence-transformers tokenizes them. Chunk: text that
    fits is tokenized the same way; longer text becomes overlapping windows of its content
    tokens, each wrapped as prompt + window in the tokenizer's own special tokens."""
    max_length, prompt = options["max_length"], options["prefix"]
    prompt = prompt.lower() if options["lowercase"] else prompt
    whole = tokenizer([prompt + t for t in texts], truncation="longest_first", max_length=max_length)["input_ids"]
    if options["long_text"] == "truncate":
        return [[row] for row in whole]
    head, tail = _special_tokens(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    window = max_length - len(head) - len(tail) - len(prompt_ids)
    if window <= options["chunk_overlap"]:
        raise ValueError(f"max_length {max_length} leaves no room for chunks after the prompt and overlap")
    step = window - options["chunk_overlap"]
    contents = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    out = []
    for truncated, content in zip(whole, contents):
        if len(content) <= window:
            out.append([truncated])
            continue
        starts = list(range(0, len(content) - options["chunk_overlap"], step))[: options["max_chunks"]]
        out.append([head + prompt_ids + content[s:s + window] + tail for s in starts])
    return out


@functools.lru_cache(maxsize=8)
def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a single sequence is wrapped in ([CLS] ... [SEP], <s> ... </s>, ...)."""
    marker = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a")["input_ids"]
    for start in range(len(wrapped) - len(marker) + 1):
        if wrapped[start:start + len(marker)] == marker:
            return wrapped[:start], wrapped[start + len(marker):]
    raise ValueError("cannot tell where the tokenizer puts its special tokens; use long_text: truncate")


class HFTextEncoder:
    """The model half of hf-text: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import AutoModel

        folder = read_folder_settings(spec.weights.path)
        trust = spec.options["trust_remote_code"]
        tokenizer = load_tokenizer(folder.model_dir, trust)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pass_token_types = "token_type_ids" in tokenizer.model_input_names
        self.options = spec.options
        self.device = device
        self.precision = resolve_precision(device, spec.options["precision"])
        self.model = AutoModel.from_pretrained(folder.model_dir, trust_remote_code=trust, dtype=torch.float32)
        self.model.eval().to(device)
        probe_ids = tokenizer("probe", truncation=True, max_length=spec.options["max_length"])["input_ids"]
        self.dim = int(self._forward([probe_ids]).shape[1])
        if spec.dim and spec.dim != self.dim:
            raise RuntimeError(f"encoder {spec.output!r}: model gives {self.dim}-d vectors, but the plan expected {spec.dim}")

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        rows = values.to_pylist()
        valid = np.array([r is not None for r in rows], dtype=bool)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        sequences = [seq for r in rows if r is not None for seq in r]
        owners = np.array([i for i, r in enumerate(rows) if r is not None for _ in r], dtype=np.int64)
        if not sequences:
            return out, valid
        lengths = [len(s) for s in sequences]
        pooled = np.zeros((len(sequences), self.dim), dtype=np.float32)
        for batch in plan_micro_batches(lengths, max_tokens):
            pooled[batch] = self._forward([sequences[i] for i in batch]).numpy()
        # A row's chunks are averaged as the vectors each chunk alone would get (normalized
        # when the model normalizes), and the mean is normalized again.
        if self.options["normalize"]:
            pooled = _l2_normalize(pooled)
        counts = np.bincount(owners, minlength=len(rows)).astype(np.float32)
        np.add.at(out, owners, pooled)
        out[valid] /= counts[valid, None]
        if self.options["normalize"]:
            out[valid] = _l2_normalize(out[valid])
        return out, valid

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Right-padded micro-batch -> (n, d) float32 pooled vectors on CPU."""
        ids, mask = pad_sequences(sequences, self.pad_id)
        lengths = mask.sum(1)
        ids, mask, lengths = ids.to(self.device), mask.to(self.device), lengths.to(self.device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.pass_token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        with torch.inference_mode(), autocast(self.device, self.precision):
            hidden = self.model(**inputs).last_hidden_state  # (n, t, d)
            pooled = pool_tokens(hidden, mask, lengths, self.options["pooling"])
        return pooled.float().cpu()


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> right-padded (n, longest) ids and attention mask, int64 on CPU."""
    n, longest = len(sequences), max(len(s) for s in sequences)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _l2_normalize(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


FAMILIES.register(HFTextFamily.name, HFTextFamily())
