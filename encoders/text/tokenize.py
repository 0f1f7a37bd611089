"""Text for the CPU prepare stage: what a sentence-transformers folder declares, the model's fast
tokenizer, and text -> token id chunks (truncated, or overlapping windows for long text).

Shared by every text tower: hf-text, and the text side of CLIP and CLAP (``tokenize_truncated``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa

from encoders.core.errors import error_value
from encoders.core.pooling import POOLING_MODES
from encoders.core.spec import Prepared

TOKENS_TYPE = pa.list_(pa.list_(pa.int32()))  # per row: one token id list per chunk


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
    root: str = ""
    truncate_dim: int | None = None  # a Matryoshka model's declared output size
    # The modules after Pooling (Dense, LayerNorm, ...), run by sentence-transformers' classes
    # (encoders/text/st_head.py); () when there are none, or only a Normalize.
    head: tuple[tuple[str, str], ...] = ()


ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


@functools.lru_cache(maxsize=16)
def read_folder_settings(path: str) -> FolderSettings:
    root = Path(path)
    modules = read_json(root / "modules.json") or []
    model_dir, pooling, normalize, head = root, None, False, []
    for module in modules:
        kind = module.get("type", "")
        if pooling is not None or head:  # after Pooling: Dense, LayerNorm, Normalize, ...
            head.append((kind, module.get("path", "")))
        elif kind.endswith(".Transformer"):
            model_dir = root / module.get("path", "")
        elif kind.endswith(".Pooling"):
            pooling = _pooling_from_st(read_json(root / module.get("path", "") / "config.json") or {}) or "mean"
        elif kind.endswith(".Normalize"):
            normalize = True
        else:  # a module between the transformer and the pooling changes the token vectors
            raise ValueError(
                f"the folder's module {module.get('name', '?')!r} ({kind or 'no type'}) comes before Pooling, which "
                "omniembed does not support: it runs the transformer and pooling itself"
            )
    if head and head[-1][0].endswith(".Normalize"):
        normalize = True
        if len(head) == 1:
            head = []  # hf-text normalizes itself
    st_config = (
        read_json(model_dir / "sentence_bert_config.json") or read_json(root / "sentence_bert_config.json") or {}
    )
    st_meta = read_json(root / "config_sentence_transformers.json") or {}
    return FolderSettings(
        model_dir=str(model_dir),
        max_length=st_config.get("max_seq_length"),
        pooling=pooling,
        normalize=normalize,
        lowercase=bool(st_config.get("do_lower_case", False)),
        prompts=dict(st_meta.get("prompts") or {}),
        default_prompt_name=st_meta.get("default_prompt_name"),
        root=str(root),
        head=tuple(head),
        truncate_dim=st_meta.get("truncate_dim"),
    )


def _pooling_from_st(config: Mapping[str, Any]) -> str | None:
    if config.get("include_prompt") is False:
        raise ValueError(
            "the folder's pooling excludes prompt tokens (include_prompt: false), which omniembed does not support"
        )
    modes = [mode for key, mode in ST_POOLING_KEYS.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in ST_POOLING_KEYS]
    if others or len(modes) > 1:
        raise ValueError(
            f"the folder's pooling {others or modes} is not supported; set pooling: to one of "
            f"{', '.join(POOLING_MODES)}"
        )
    return modes[0] if modes else None


def read_json(path: Path) -> Any:
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
        out.append([head + prompt_ids + content[s : s + window] + tail for s in starts])
    return out


@functools.lru_cache(maxsize=8)
def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a single sequence is wrapped in ([CLS] ... [SEP], <s> ... </s>, ...)."""
    marker = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a")["input_ids"]
    for start in range(len(wrapped) - len(marker) + 1):
        if wrapped[start : start + len(marker)] == marker:
            return wrapped[:start], wrapped[start + len(marker) :]
    raise ValueError("cannot tell where the tokenizer puts its special tokens; use long_text: truncate")


def tokenize_truncated(model_dir: str, values: pa.Array, max_length: int, max_chars: int) -> Prepared:
    """A text tower's prepare (CLIP, CLAP): the folder's tokenizer, no prompt, truncated to
    ``max_length`` tokens."""
    options = {
        "max_chars": max_chars,
        "lowercase": False,
        "max_length": max_length,
        "prefix": "",
        "long_text": "truncate",
    }
    return tokenize_texts(load_tokenizer(model_dir, False), values.to_pylist(), options)


def resolve_max_length(opts: dict[str, Any], limit: int, default: int | None = None) -> None:
    """``max_length`` (the user's, else ``default``, else the model's ``limit``) checked against the
    positions the model has."""
    if opts["max_length"] is None:
        opts["max_length"] = default or limit
    if not 2 < opts["max_length"] <= limit:
        raise ValueError(f"max_length {opts['max_length']} is out of range; the model takes 3 to {limit} tokens")
