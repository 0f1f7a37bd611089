"""hf-vision (ViT, DINOv2, CLIP vision: cls, mean, patches) and hf-clip (text and image in one
space): tiny configs saved with save_pretrained, loaded through the real path, compared with a
direct call of the same model on the same preprocessed tensor, on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES
from encoders.image.prepare import ImagePreprocess
from encoders.image.tensors import images_to_tensor, to_model_input
from tests.conftest import TINY_LAYERS
from tests.encoders.test_image_cnn import cosine, plan_one
from tests.image_data import encode, real_photos

VISION_KINDS = ("vit", "dinov2", "clip_vision_model")


def save_tiny_vision(folder: Path, kind: str) -> Path:
    from transformers import (
        BitImageProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    common = dict(**TINY_LAYERS, patch_size=8)
    if kind == "vit":
        ViTModel(ViTConfig(image_size=32, **common)).eval().save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    elif kind == "dinov2":
        Dinov2Model(Dinov2Config(image_size=32, **common)).eval().save_pretrained(folder)
        BitImageProcessor(
            size={"shortest_edge": 40},
            crop_size={"height": 32, "width": 32},
            do_center_crop=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ).save_pretrained(folder)
    else:
        CLIPVisionModel(CLIPVisionConfig(image_size=32, **common)).eval().save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>")]
    vocab: dict[str, int] = {}
    for token in (
        chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    ):
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizerFast(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(vocab),
        **TINY_LAYERS,
        max_position_embeddings=77,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(**TINY_LAYERS, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vision_folders(tmp_path_factory) -> dict[str, str]:
    return {kind: str(save_tiny_vision(tmp_path_factory.mktemp(kind), kind)) for kind in VISION_KINDS}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [encode(image) for image in list(real_photos().values())[:5]]


def direct_hidden(folder: str, spec, prepared_values: pa.Array) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    prep = ImagePreprocess.from_options(spec.options)
    images, _ = images_to_tensor(prepared_values, prep.crop)
    x = (images.float() / 255 - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("pooling", ["cls", "mean", "patches"])
def test_vision_fidelity(vision_folders, jpegs, kind, pooling):
    spec = plan_one(vision_folders[kind], pooling=pooling)
    assert spec.family == "hf-vision" and spec.dim == 32 and spec.options["patch_grid"] == [4, 4]
    family = FAMILIES.get("hf-vision")
    prepared = family.prepare(spec, "image", pa.array(jpegs + [None, b"junk"]))
    assert prepared.errors[-1].startswith("decode_failed") and prepared.errors[-2] is None
    result = family.load(spec, torch.device("cpu"))("image", prepared.values)
    vectors, valid, extras = result.vectors, result.valid, result.extras
    assert valid.tolist() == [True] * len(jpegs) + [False, False]
    hidden = direct_hidden(vision_folders[kind], spec, prepared.values)  # (n, 1 + 16, 32)
    assert hidden.shape[1] == 17
    reference = hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(1)
    assert cosine(vectors[valid], reference.numpy()).min() >= 0.9999
    if pooling == "patches":
        grid = extras["patches"][valid].reshape(len(jpegs), 16, 32)
        assert cosine(grid.reshape(-1, 32), hidden[:, 1:].reshape(-1, 32).numpy()).min() >= 0.9999
    else:
        assert not extras


def test_processor_config_is_the_preprocessing(vision_folders):
    vit = plan_one(vision_folders["vit"]).options["preprocessing"]
    assert (vit["resize"], vit["crop"], vit["keep_aspect"], vit["mean"]) == (32, 32, False, [0.5] * 3)
    dino = plan_one(vision_folders["dinov2"]).options["preprocessing"]
    assert (dino["resize"], dino["crop"], dino["keep_aspect"], dino["interpolation"]) == (40, 32, True, "bicubic")


def test_bad_pooling_lists_the_modes(vision_folders):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="valid modes: cls, mean, patches"):
        plan_one(vision_folders["vit"], pooling="max")


def test_clip_text_and_image_fidelity(clip_folder, jpegs):
    from transformers import AutoTokenizer, CLIPModel

    from pipeline.config import config_from_dict
    from pipeline.plan import plan_encoders

    config = config_from_dict(
        {
            "sources": [{"path": "x", "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [
                {
                    "output": "clip",
                    "model": clip_folder,
                    "columns": {"text": "caption", "image": "image"},
                    "normalize": False,
                }
            ],
        }
    )
    spec = plan_encoders(config.encoders)[0]
    assert spec.family == "hf-clip" and spec.dim == 24
    family = FAMILIES.get("hf-clip")
    encoder = family.load(spec, torch.device("cpu"))
    texts = ["the cat", "a photo of the cat sitting on the mat", "", None]
    prepared_text = family.prepare(spec, "text", pa.array(texts))
    assert prepared_text.errors[2].startswith("empty_text") and prepared_text.errors[3] is None
    result = encoder("text", prepared_text.values)
    text_vectors, text_valid = result.vectors, result.valid
    prepared_image = family.prepare(spec, "image", pa.array(jpegs))
    result = encoder("image", prepared_image.values)
    image_vectors, image_valid = result.vectors, result.valid
    assert text_valid.tolist() == [True, True, False, False] and image_valid.all()

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_folder)
    prep = ImagePreprocess.from_options(spec.options)
    images, _ = images_to_tensor(prepared_image.values, prep.crop)
    with torch.no_grad():
        text_ref = model.get_text_features(**tokenizer(texts[:2], padding=True, return_tensors="pt"))
        image_ref = model.get_image_features(pixel_values=to_model_input(images, prep, torch.device("cpu")))
    text_ref = text_ref if isinstance(text_ref, torch.Tensor) else text_ref.pooler_output
    image_ref = image_ref if isinstance(image_ref, torch.Tensor) else image_ref.pooler_output
    assert text_ref.shape[1] == image_ref.shape[1] == 24
    assert cosine(text_vectors[:2], text_ref.numpy()).min() >= 0.9999
    assert cosine(image_vectors, image_ref.numpy()).min() >= 0.9999
    # One space: the logits CLIP itself computes are the cosine of the two columns (times its scale).
    with torch.no_grad():
        logits = model(
            **tokenizer(texts[:2], padding=True, return_tensors="pt"),
            pixel_values=to_model_input(images, prep, torch.device("cpu")),
        ).logits_per_text
    a = text_vectors[:2] / np.linalg.norm(text_vectors[:2], axis=1, keepdims=True)
    b = image_vectors / np.linalg.norm(image_vectors, axis=1, keepdims=True)
    assert np.allclose(a @ b.T * model.logit_scale.exp().item(), logits.numpy(), atol=1e-3)


PROCESSORS = {
    # name: (processor, mean |ours - processor| allowed, in normalized units)
    "vit": ("ViTImageProcessor", {"size": {"height": 224, "width": 224}}, 1e-4),  # bilinear: the same pixels
    "clip": ("CLIPImageProcessor", {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}, 0.02),
    "bit": (
        "BitImageProcessor",
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, "do_center_crop": True},
        0.02,
    ),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_prepared_pixels_match_the_hugging_face_processor(name, tmp_path):
    """The reference is the processor itself (the PIL backend), not our own preprocessing.
    Bicubic (CLIP, BiT) differs between PIL and torchvision's antialiased resize: within 0.02 on
    average in normalized units (about half a uint8 level); bilinear (ViT) gives the same pixels."""
    import io

    import transformers
    from PIL import Image

    from encoders.image.prepare import prepare_images, preprocessing_from_processor

    cls, kwargs, tolerance = PROCESSORS[name]
    getattr(transformers, cls)(**kwargs).save_pretrained(tmp_path)
    prep = ImagePreprocess.from_options({"preprocessing": preprocessing_from_processor(str(tmp_path))})
    jpegs = [encode(image) for image in list(real_photos().values())[:4]]
    images, _ = images_to_tensor(prepare_images(pa.array(jpegs), prep).values, prep.crop)
    ours = (images.float() / 255 - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    pils = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    reference = processor(pils, return_tensors="pt")["pixel_values"]
    assert ours.shape == reference.shape
    assert float((ours - reference).abs().mean()) < tolerance


def test_processor_class_defaults_are_kept(tmp_path):
    """A CLIP config that leaves out do_center_crop still crops (CLIP's class default); a
    LANCZOS resample is refused in one line rather than run as bilinear."""
    import json

    from transformers import CLIPImageProcessor

    from encoders.image.prepare import preprocessing_from_processor

    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    del config["do_center_crop"], config["resample"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    declared = preprocessing_from_processor(str(tmp_path))
    assert (declared["resize"], declared["crop"], declared["interpolation"]) == (40, 32, "bicubic")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**config, "resample": 1}))
    with pytest.raises(ValueError, match="resample 'lanczos' has no tensor equivalent"):
        preprocessing_from_processor(str(tmp_path))
