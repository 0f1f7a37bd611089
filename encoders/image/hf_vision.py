"""hf-vision: Hugging Face vision transformers (ViT, DINOv2, CLIP vision).

``AutoModel`` on the folder; pooling over ``last_hidden_state`` (n, t, d):
  - ``cls``: the first token (as the model leaves it: DINOv2 layer-normed, CLIP vision not);
  - ``mean``: the mean of the patch tokens (CLS and register tokens left out);
  - ``patches``: the (grid_h * grid_w, d) patch tokens, row-major, into ``<output>_patches``;
    ``<output>_embedding`` then holds their mean. The grid shape is in the metadata.

Preprocessing comes from the folder's ``preprocessor_config.json`` (or a ``preprocessing`` option).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from encoders.core.device import DeviceModel, autocast, check_runtime_options
from encoders.core.spec import EncodeResult, EncoderSpec, SpecRequest, check_dim, validate_options
from encoders.image.family import ImageFamily
from encoders.image.prepare import (
    IMAGE_INPUT_OPTIONS,
    ImagePreprocess,
    preprocessing_from_processor,
    resolve_image_options,
)
from encoders.image.tensors import encode_images, to_model_input

VISION_POOLING = ("cls", "mean", "patches")
VISION_OPTIONS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "pooling": (str, "cls"),
    "normalize": (bool, False),
    **IMAGE_INPUT_OPTIONS,
    "precision": (str, "auto"),
    "micro_batch": (int, 32),
    "trust_remote_code": (bool, False),
}


def _vision_config(path: str) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return getattr(config, "vision_config", None) or config


class HFVisionFamily(ImageFamily):
    name = "hf-vision"

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        from encoders.core.weights import weights_sha256

        opts = validate_options(request.options, VISION_OPTIONS, self.name)
        if opts["pooling"] not in VISION_POOLING:
            raise ValueError(
                f"pooling {opts['pooling']!r} is not supported for images; valid modes: {', '.join(VISION_POOLING)}"
            )
        declared = (
            None
            if opts["preprocessing"] is not None
            else preprocessing_from_processor(
                request.weights.path, trust_remote_code=bool(opts.get("trust_remote_code", False))
            )
        )
        resolve_image_options(opts, declared)
        check_runtime_options(opts)
        vision = _vision_config(request.weights.path)
        crop, patch = opts["preprocessing"]["crop"], int(vision.patch_size)
        if crop % patch:
            raise ValueError(f"crop {crop} is not a multiple of the model's patch size {patch}")
        opts["patch_grid"] = [crop // patch, crop // patch]
        sha = weights_sha256(request.weights.path)
        return request.spec(self.name, sha, opts, request.dim or int(vision.hidden_size))

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFVisionEncoder":
        return HFVisionEncoder(spec, device)


class HFVisionEncoder(DeviceModel):
    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import AutoModel

        super().__init__(spec, device)
        self.prep = ImagePreprocess.from_options(spec.options)
        self.model = (
            AutoModel.from_pretrained(
                spec.weights.path, dtype=torch.float32, trust_remote_code=spec.options["trust_remote_code"]
            )
            .eval()
            .to(device)
        )
        grid = spec.options["patch_grid"]
        self.patches = grid[0] * grid[1]
        probe, _ = self._forward(torch.zeros((1, 3, self.prep.crop, self.prep.crop), dtype=torch.uint8))
        self.dim = check_dim(spec, int(probe.shape[1]))

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> EncodeResult:
        patches = self.patches if self.options["pooling"] == "patches" else 0
        return encode_images(values, self.prep.crop, self.options["micro_batch"], self._forward, self.dim, patches)

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
