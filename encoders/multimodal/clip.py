"""hf-clip: CLIP's text and image towers into one space, one encoder for
``columns: {text: ..., image: ...}``.

``get_text_features`` and ``get_image_features`` (the projections into the shared space),
L2-normalized by default as CLIP compares them. Text is tokenized by the folder's tokenizer,
truncated to the model's positions (encoders/text/tokenize.py); images take the folder's image
processor settings (encoders/image/prepare.py).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from encoders.core.batching import pad_sequences
from encoders.core.device import DeviceModel, autocast, check_runtime_options
from encoders.core.spec import EncodeResult, EncoderSpec, Prepared, SpecRequest, validate_options
from encoders.image.family import ImageFamily
from encoders.image.prepare import (
    IMAGE_INPUT_OPTIONS,
    ImagePreprocess,
    preprocessing_from_processor,
    resolve_image_options,
)
from encoders.image.tensors import images_to_tensor, to_model_input
from encoders.multimodal.towers import in_batches, shared_space, token_sequences
from encoders.text.tokenize import load_tokenizer, resolve_max_length, tokenize_truncated

CLIP_OPTIONS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "normalize": (bool, True),
    **IMAGE_INPUT_OPTIONS,
    "max_length": (int, None),
    "max_chars": (int, 1_000_000),
    "precision": (str, "auto"),
    "micro_batch": (int, 32),
}


class HFClipFamily(ImageFamily):
    name = "hf-clip"
    modalities = ("text", "image")

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        from transformers import AutoConfig

        from encoders.core.weights import weights_sha256

        opts = validate_options(request.options, CLIP_OPTIONS, self.name)
        declared = None if opts["preprocessing"] is not None else preprocessing_from_processor(request.weights.path)
        resolve_image_options(opts, declared)
        check_runtime_options(opts)
        config = AutoConfig.from_pretrained(request.weights.path)
        resolve_max_length(opts, int(config.text_config.max_position_embeddings))
        sha = weights_sha256(request.weights.path)
        return request.spec(self.name, sha, opts, request.dim or int(config.projection_dim))

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        if modality == "image":
            return super().prepare(spec, modality, values)
        return tokenize_truncated(spec.weights.path, values, spec.options["max_length"], spec.options["max_chars"])

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFClipEncoder":
        return HFClipEncoder(spec, device)


class HFClipEncoder(DeviceModel):
    """The model half of hf-clip: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import CLIPModel

        super().__init__(spec, device)
        self.prep = ImagePreprocess.from_options(spec.options)
        self.model = CLIPModel.from_pretrained(spec.weights.path, dtype=torch.float32).eval().to(device)
        tokenizer = load_tokenizer(spec.weights.path, False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.dim = int(self.model.config.projection_dim)

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> EncodeResult:
        step = self.options["micro_batch"]
        if modality == "image":
            images, valid = images_to_tensor(values, self.prep.crop)
            features = [self._image(b) for b in in_batches(images, step)]
        else:
            sequences, valid = token_sequences(values)
            features = [self._text(b) for b in in_batches(sequences, step)]
        return shared_space(features, valid, self.dim, self.options["normalize"])

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
