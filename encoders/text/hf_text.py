"""Hugging Face text encoders (``AutoModel``), with sentence-transformers folder settings.

Prepare (CPU task, encoders/text/tokenize.py): text -> token id chunks. Encode (actor): dynamic padding, forward,
pooling, the folder's modules after Pooling (Dense, LayerNorm, ...: encoders/text/st_head.py),
chunk pooling, L2 normalization. The vectors equal sentence-transformers' ``encode`` for the
same folder: same max_seq_length, pooling, modules, Normalize, prompts and lowercasing.

``backend: onnx`` runs only the transformer's forward in ONNX Runtime (encoders/text/onnx_backend.py),
in fp32 whatever ``precision`` asks (ORT on a CPU has no bf16 autocast), with int8 weights under
``quantize: int8``; everything after the hidden states is the same code as for ``backend: torch``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from encoders.core.batching import pad_sequences, plan_micro_batches
from encoders.core.device import DeviceModel, autocast, resolve_precision
from encoders.core.pooling import check_pooling, pool_tokens
from encoders.core.probe import meta_dim, spec_with_dim
from encoders.core.spec import EncodeResult, EncoderFamily, EncoderSpec, Prepared, SpecRequest, validate_options
from encoders.text.onnx_backend import check_backend, load_onnx_transformer
from encoders.text.st_head import describe, head_classes, head_files, load_head, run_head
from encoders.text.tokenize import (
    FolderSettings,
    load_tokenizer,
    read_folder_settings,
    resolve_max_length,
    tokenize_texts,
)

LONG_TEXT_MODES = ("truncate", "chunk")

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
    "backend": (str, "torch"),  # torch | onnx (encoders/text/onnx_backend.py)
    "quantize": (str, "none"),  # none | int8, with backend onnx only
    "trust_remote_code": (bool, False),
}


class HFTextFamily(EncoderFamily):
    name = "hf-text"
    modalities = ("text",)
    # On CPU, one torch thread per actor in as many actors as there are cores: on 2 cores, 40k
    # short texts took 57.8-61.3 s end to end against 67.3-80.6 s for one 2-thread actor,
    # whose forward waits at every op for the thread a prepare or write task preempted.
    cpu_actor_threads = 1

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        from encoders.core.weights import weights_sha256

        folder = read_folder_settings(request.weights.path)
        opts = validate_options(request.options, TEXT_OPTIONS, self.name)
        tokenizer = load_tokenizer(folder.model_dir, opts["trust_remote_code"])
        if opts["pooling"] is None:
            opts["pooling"] = folder.pooling or "mean"
        check_pooling(opts["pooling"])
        if opts["normalize"] is None:
            opts["normalize"] = folder.normalize
        if opts["lowercase"] is None:
            opts["lowercase"] = folder.lowercase
        limit = _model_max_length(folder.model_dir, tokenizer)
        resolve_max_length(opts, limit, min(folder.max_length or limit, limit))
        opts["prefix"] = _resolve_prefix(opts.pop("prefix"), opts.pop("prompt_name"), folder)
        if opts["long_text"] not in LONG_TEXT_MODES:
            raise ValueError(
                f"long_text {opts['long_text']!r} is not valid; valid values: {', '.join(LONG_TEXT_MODES)}"
            )
        if opts["long_text"] == "chunk" and not 0 <= opts["chunk_overlap"] < opts["max_length"] // 2:
            raise ValueError(f"chunk_overlap must be between 0 and half of max_length ({opts['max_length']})")
        if opts["max_chunks"] < 1:
            raise ValueError("max_chunks must be >= 1")
        resolve_precision(torch.device("cpu"), opts["precision"])  # validates the name
        check_backend(opts)  # backend onnx: precision pinned to fp32
        sha = weights_sha256(folder.model_dir)
        if folder.truncate_dim:
            opts["truncate_dim"] = int(folder.truncate_dim)  # the planner's default for dimensions
        if folder.head:
            head_classes(folder.head, folder.root, opts["trust_remote_code"])  # one line, before Ray, if missing
            opts["modules"] = describe(folder.head)
            parts = [sha] + [weights_sha256(str(d)) for d in head_files(folder.head, folder.root)]
            sha = hashlib.sha256("\n".join(parts + opts["modules"]).encode()).hexdigest()
        return spec_with_dim(self, request, opts, sha, pooling=opts["pooling"])

    def meta_dim(self, spec: EncoderSpec) -> int | None:
        return _meta_dim(spec)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        folder = read_folder_settings(spec.weights.path)
        tokenizer = load_tokenizer(folder.model_dir, spec.options["trust_remote_code"])
        return tokenize_texts(tokenizer, values.to_pylist(), spec.options)

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFTextEncoder":
        return HFTextEncoder(spec, device)


def _meta_dim(spec: EncoderSpec) -> int | None:
    """D without loading weights: the transformer on the meta device (pooling keeps its width),
    then the folder's modules after Pooling, which are small, on the CPU."""
    from transformers import AutoConfig, AutoModel

    folder = read_folder_settings(spec.weights.path)
    trust = spec.options["trust_remote_code"]
    config = AutoConfig.from_pretrained(folder.model_dir, trust_remote_code=trust)

    def run(model: Any) -> torch.Tensor:
        # No attention mask: building one from a mask tensor reads its values, which meta has not.
        return model(input_ids=torch.zeros((1, 8), dtype=torch.long)).last_hidden_state

    dim = meta_dim(lambda: AutoModel.from_config(config, trust_remote_code=trust), run)
    if dim is None or not folder.head:
        return dim
    head = load_head(folder.head, folder.root, trust)
    with torch.no_grad():
        mask = torch.ones((1, 8), dtype=torch.long)
        return int(run_head(head, torch.zeros((1, dim)), torch.zeros((1, 8, dim)), mask).shape[-1])


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
            raise ValueError(
                f"prompt_name {prompt_name!r} is not declared by the model; declared: "
                f"{', '.join(folder.prompts) or '(none)'}"
            )
        return folder.prompts[prompt_name]
    if prefix is not None:
        return prefix
    if folder.default_prompt_name:
        return folder.prompts.get(folder.default_prompt_name, "")
    return ""


class HFTextEncoder(DeviceModel):
    """The model half of hf-text: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import AutoModel

        folder = read_folder_settings(spec.weights.path)
        trust = spec.options["trust_remote_code"]
        tokenizer = load_tokenizer(folder.model_dir, trust)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pass_token_types = "token_type_ids" in tokenizer.model_input_names
        super().__init__(spec, device)
        if spec.options["backend"] == "onnx":  # only the transformer's forward moves to ONNX Runtime
            self.model: Any = load_onnx_transformer(
                folder.model_dir, spec.weights_sha256, spec.options["quantize"], self.pass_token_types, trust
            )
        else:
            self.model = AutoModel.from_pretrained(folder.model_dir, trust_remote_code=trust, dtype=torch.float32)
            self.model.eval().to(device)
        self.head = load_head(folder.head, folder.root, trust).to(device) if folder.head else None
        probe_ids = tokenizer("probe", truncation=True, max_length=spec.options["max_length"])["input_ids"]
        self.dim = int(self._forward([probe_ids]).shape[1])
        if spec.dim and spec.dim != self.dim:
            raise RuntimeError(
                f"encoder {spec.output!r}: model gives {self.dim}-d vectors, but the plan expected {spec.dim}"
            )

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 8192) -> EncodeResult:
        rows = values.to_pylist()
        valid = np.array([r is not None for r in rows], dtype=bool)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        sequences = [seq for r in rows if r is not None for seq in r]
        owners = np.array([i for i, r in enumerate(rows) if r is not None for _ in r], dtype=np.int64)
        if not sequences:
            return EncodeResult(out, valid)
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
        return EncodeResult(out, valid)

    def _forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Right-padded micro-batch -> (n, d) float32 pooled vectors on CPU."""
        ids, mask = pad_sequences(sequences, self.pad_id)
        lengths = mask.sum(1)
        ids, mask, lengths = ids.to(self.device), mask.to(self.device), lengths.to(self.device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.pass_token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        with torch.inference_mode():
            with autocast(self.device, self.precision):
                hidden = self.model(**inputs).last_hidden_state  # (n, t, d)
                pooled = pool_tokens(hidden, mask, lengths, self.options["pooling"])
            if self.head is not None:  # the folder's own modules, in float32 as sentence-transformers runs them
                pooled = run_head(self.head, pooled.float(), hidden.float(), mask)
        return pooled.float().cpu()


def _l2_normalize(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
