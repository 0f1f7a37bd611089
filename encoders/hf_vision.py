"""Hugging Face vision transformers (ViT, DINOv2, CLIP vision) and CLIP's shared text-image space.

hf-vision: ``AutoModel`` on the folder; pooling over ``last_hidden_state`` (n, t, d):
  - ``cls``: the first token (as the model leaves it: DINOv2 layer-normed, CLIP vision not);
  - ``mean``: the mean of the patch tokens (CLS and register tokens left out);
  - ``patches``: the (grid_h * grid_w, d) patch tokens, row-major, into ``<output>_patches``;
    ``<output>_embedding`` then holds their mean. The grid shape is in the metadata.
hf-clip: one encoder for ``columns: {text: ..., image: ...}``; ``get_text_features`` and
``get_image_features`` (the projections into the shared space), L2-normalized by default.

Preprocessing comes from the folder's ``preprocessor_config.json`` (or a ``preprocessing`` option).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from encoders.device import autocast, resolve_precision
from encoders.hf_text import pad_sequences
from encoders.images import (DEFAULT_MAX_PIXELS, ImagePreprocess, images_to_tensor, prepare_images,
                             preprocessing_from_processor, to_model_input)
from encoders.registry import FAMILIES, MODEL_TYPE_FAMILIES
from encoders.spec import EncoderSpec, Prepared, validate_options
from encoders.weights import ResolvedWeights

VISION_POOLING = ("cls", "mean", "patches")
VISION_OPTIONS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "pooling": (str, "cls"),
    "normalize": (bool, False),
    "preprocessing": (dict, None),
    "max_pixels": (int, DEFAULT_MAX_PIXELS),
    "precision": (str, "auto"),
    "micro_batch": (int, 32),
    "trust_remote_code": (bool, False),
}
CLIP_OPTIONS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "normalize": (bool, True),
    "preprocessing": (dict, None),
    "max_pixels": (int, DEFAULT_MAX_PIXELS),
    "max_length": (int, None),
    "max_chars": (int, 1_000_000),
    "precision": (str, "auto"),
    "micro_batch": (int, 32),
}


@functools.lru_cache(maxsize=16)
def _config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


def _resolve_preprocessing(opts: dict[str, Any], path: str) -> None:
    if opts["preprocessing"] is None:
        opts["preprocessing"] = preprocessing_from_processor(path)
    opts["preprocessing"] = ImagePreprocess.from_options(opts).as_dict()
    if opts["max_pixels"] < 1 or opts["micro_batch"] < 1:
        raise ValueError("max_pixels and micro_batch must be >= 1")
    resolve_precision(torch.device("cpu"), opts["precision"])  # validates the name


class HFVisionFamily:
    name = "hf-vision"
    modalities = ("image",)

    def build_spec(self, output: str, columns: Mapping[str, str], weights: ResolvedWeights,
                   options: Mapping[str, Any], dim: int | None) -> EncoderSpec:
        from encoders.weights import weights_sha256

        opts = validate_options(options, VISION_OPTIONS, self.name)
        if opts["pooling"] not in VISION_POOLING:
            raise ValueError(f"pooling {opts['pooling']!r} is not supported for images; valid modes: {', '.join(VISION_POOLING)}")
        _resolve_preprocessing(opts, weights.path)
        vision = _vision_config(_config(weights.path))
        crop, patch = opts["preprocessing"]["crop"], int(vision.patch_size)
        if crop % patch:
            raise ValueError(f"crop {crop} is not a multiple of the model's patch size {patch}")
        opts["patch_grid"] = [crop // patch, crop // patch]
        return EncoderSpec(output, self.name, dict(columns), weights, dim or int(vision.hidden_size),
                           weights_sha256(weights.path), opts)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        return prepare_images(values, ImagePreprocess.from_options(spec.options), spec.options["max_pixels"])

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFVisionEncoder":
        return HFVisionEncoder(spec, device)


class HFVisionEncoder:
    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import AutoModel

        self.options = spec.options
        self.prep = ImagePreprocess.from_options(spec.options)
        self.device = device
        self.precision = resolve_precision(device, spec.options["precision"])
        self.model = AutoModel.from_pretrained(spec.weights.path, dtype=torch.float32,
                                               trust_remote_code=spec.options["trust_remote_code"]).eval().to(device)
        grid = spec.options["patch_grid"]
        self.patches = grid[0] * grid[1]
        probe, _ = self._forward(torch.zeros((1, 3, self.prep.crop, self.prep.crop), dtype=torch.uint8))
        self.dim = int(probe.shape[1])
        if spec.dim and spec.dim != self.dim:
            raise RuntimeError(f"encoder {spec.output!r}: model gives {self.dim}-d vectors, but the plan expected {spec.dim}")

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> tuple[np.ndarray, ...]:
        images, valid = images_to_tensor(values, self.prep.crop)
        out = np.zeros((len(valid), self.dim), dtype=np.float32)
        patches = np.zeros((len(valid), self.patches * self.dim), dtype=np.float32)
        step = self.options["micro_batch"]
        pooled, grids = [], []
        for s in range(0, images.shape[0], step):
            vectors, grid = self._forward(images[s:s + step])
            pooled.append(vectors)
            grids.append(grid)
        if pooled:
            out[valid] = torch.cat(pooled).numpy()
            if self.options["pooling"] == "patches":
                patches[valid] = torch.cat(grids).reshape(int(valid.sum()), -1).numpy()
        if self.options["pooling"] == "patches":
            return out, valid, {"patches": patches}
        return out, valid

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, 3, h, w) uint8 -> ((n, d) pooled, (n, patches, d) patch tokens or None), float32 on CPU."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            hidden = self.model(pixel_values=to_model_input(images, self.prep, self.device)).last_hidden_state.float()
        prefix = hidden.shape[1] - self.patches  # CLS (+ register tokens) come first
        tokens = hidden[:, prefix:]  # (n, patches, d)
        pooled = hidden[:, 0] if self.options["pooling"] == "cls" else tokens.mean(1)
        if self.options["normalize"]:
            pooled = torch.nn.functional.normalize(pooled, dim=1)
        return pooled.cpu(), (tokens.cpu() if self.options["pooling"] == "patches" else None)


class HFClipFamily:
    """CLIP: text and images into one space. Text is tokenized as CLIP's tokenizer does (truncated
    to the model's positions); images take the folder's image processor settings."""

    name = "hf-clip"
    modalities = ("text", "image")

    def build_spec(self, output: str, columns: Mapping[str, str], weights: ResolvedWeights,
                   options: Mapping[str, Any], dim: int | None) -> EncoderSpec:
        from encoders.weights import weights_sha256

        opts = validate_options(options, CLIP_OPTIONS, self.name)
        _resolve_preprocessing(opts, weights.path)
        config = _config(weights.path)
        limit = int(config.text_config.max_position_embeddings)
        opts["max_length"] = opts["max_length"] or limit
        if not 2 < opts["max_length"] <= limit:
            raise ValueError(f"max_length {opts['max_length']} is out of range; the model takes 3 to {limit} tokens")
        return EncoderSpec(output, self.name, dict(columns), weights, dim or int(config.projection_dim),
                           weights_sha256(weights.path), opts)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        if modality == "image":
            return prepare_images(values, ImagePreprocess.from_options(spec.options), spec.options["max_pixels"])
        from encoders.hf_text import load_tokenizer, tokenize_texts

        text_options = {"max_chars": spec.options["max_chars"], "lowercase": False, "max_length": spec.options["max_length"],
                        "prefix": "", "long_text": "truncate"}
        return tokenize_texts(load_tokenizer(spec.weights.path, False), values.to_pylist(), text_options)

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFClipEncoder":
        return HFClipEncoder(spec, device)


class HFClipEncoder:
    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import CLIPModel

        from encoders.hf_text import load_tokenizer

        self.options = spec.options
        self.prep = ImagePreprocess.from_options(spec.options)
        self.device = device
        self.precision = resolve_precision(device, spec.options["precision"])
        self.model = CLIPModel.from_pretrained(spec.weights.path, dtype=torch.float32).eval().to(device)
        tokenizer = load_tokenizer(spec.weights.path, False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.dim = int(self.model.config.projection_dim)

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
        step = self.options["micro_batch"]
        if modality == "image":
            images, valid = images_to_tensor(values, self.prep.crop)
            batches = [images[s:s + step] for s in range(0, images.shape[0], step)]
        else:
            rows = values.to_pylist()
            valid = np.array([r is not None for r in rows], dtype=bool)
            sequences = [r[0] for r in rows if r is not None]
            batches = [sequences[s:s + step] for s in range(0, len(sequences), step)]
        out = np.zeros((len(valid), self.dim), dtype=np.float32)
        vectors = [self._image(b) if modality == "image" else self._text(b) for b in batches]
        if vectors:
            features = torch.cat(vectors)
            if self.options["normalize"]:
                features = torch.nn.functional.normalize(features, dim=1)
            out[valid] = features.numpy()
        return out, valid

    def _image(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.precision):
            features = self.model.get_image_features(pixel_values=to_model_input(images, self.prep, self.device))
        return _tensor(features).float().cpu()

    def _text(self, sequences: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_sequences(sequences, self.pad_id)
        with torch.inference_mode(), autocast(self.device, self.precision):
            features = self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return _tensor(features).float().cpu()


def _tensor(features: Any) -> torch.Tensor:
    """transformers 5 may return a model output whose pooler_output holds the projected features."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


FAMILIES.register(HFVisionFamily.name, HFVisionFamily())
FAMILIES.register(HFClipFamily.name, HFClipFamily())
for _model_type in ("vit", "dinov2", "dinov2_with_registers", "clip_vision_model"):
    MODEL_TYPE_FAMILIES[_model_type] = HFVisionFamily.name
MODEL_TYPE_FAMILIES["clip"] = HFClipFamily.name
