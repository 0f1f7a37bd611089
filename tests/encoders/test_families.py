"""Every registered family, the same floor for each: a tiny model saved the way its users save
theirs, planned through the user's path (``pipeline.plan``), then prepare, load and encode, with
good, absent and bad rows side by side. As torchvision's tests loop over every registered model,
a new family fails ``test_every_registered_family_has_a_tiny_model`` until it adds its builder
here. Fidelity to each model's own reference computation lives in the family's own tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES, MODELS
from encoders.core.errors import ERROR_CODES, error_code
from encoders.core.spec import EncodeResult
from pipeline.config import config_from_dict
from pipeline.plan import plan_encoders
from tests.conftest import _save_tiny_bert
from tests.image_data import encode, real_photos


def _text(folder: Path) -> tuple[str, dict[str, Any]]:
    _save_tiny_bert(folder)
    return str(folder), {}


def _torchvision(folder: Path) -> tuple[str, dict[str, Any]]:
    from tests.encoders.test_image_cnn import save_torchvision_folder

    return str(save_torchvision_folder(folder, "mobilenet_v3_small")), {}


def _vision(folder: Path) -> tuple[str, dict[str, Any]]:
    from tests.encoders.test_image_hf import save_tiny_vision

    return str(save_tiny_vision(folder, "vit")), {"pooling": "patches"}


def _clip(folder: Path) -> tuple[str, dict[str, Any]]:
    from tests.encoders.test_image_hf import save_tiny_clip

    return str(save_tiny_clip(folder)), {}


def _ast(folder: Path) -> tuple[str, dict[str, Any]]:
    from tests.encoders.test_hf_audio import save_tiny_ast

    return str(save_tiny_ast(folder)), {}


def _clap(folder: Path) -> tuple[str, dict[str, Any]]:
    from tests.encoders.test_hf_audio import save_tiny_clap

    return str(save_tiny_clap(folder)), {}


def _speaker(folder: Path) -> tuple[str, dict[str, Any]]:
    """A resemblyzer-layout checkpoint of a small LSTM, with the alias's declared front end."""
    from encoders.audio.speaker import SpeakerNet

    torch.manual_seed(0)
    path = folder / "speaker.pt"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state": SpeakerNet(n_mels=40, hidden=16, embedding=8, layers=1).state_dict()}, path)
    return str(path), {"family": "audio-speaker", **MODELS.get("resemblyzer").defaults}


def _sfx(folder: Path) -> tuple[str, dict[str, Any]]:
    """An aiSFX-layout checkpoint (state dict, dataset table) of a narrow CNN, with the alias's
    declared front end."""
    from encoders.audio.sfx import SFXNet

    torch.manual_seed(0)
    path = folder / "checkpoint.pth"
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"embedding_net.{k}": v for k, v in SFXNet(width=4).state_dict().items()}
    torch.save((state, {}), path)
    return str(path), {"family": "audio-sfx", **MODELS.get("aisfx").defaults}


# family -> builder: folder -> (model reference, encoder options)
TINY: dict[str, Callable[[Path], tuple[str, dict[str, Any]]]] = {
    "hf-text": _text,
    "image-cnn": _torchvision,
    "hf-vision": _vision,
    "hf-clip": _clip,
    "hf-audio": _ast,
    "hf-clap": _clap,
    "audio-speaker": _speaker,
    "audio-sfx": _sfx,
}


def _wav(seconds: float, rate: int = 16000, seed: int = 0) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.05, t.shape)
    wave = (0.4 * np.sin(2 * np.pi * (220 + 110 * seed) * t) + noise).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs() -> dict[str, list[Any]]:
    """Per modality: two good rows, one absent, one bad (in that order: good, absent, bad, good)."""
    photos = list(real_photos().values())
    return {
        "text": ["a red shoe", None, "   ", "the blue coffee mug"],
        "image": [encode(photos[0]), None, b"not an image", encode(photos[1])],
        "audio": [_wav(3.0, seed=0), None, b"not audio", _wav(4.5, seed=1)],
    }


def test_every_registered_family_has_a_tiny_model():
    assert set(FAMILIES.names()) == set(TINY), "add a tiny-model builder for each new family to TINY"


@pytest.mark.parametrize("name", sorted(TINY))
def test_family_plans_prepares_loads_and_encodes(name, tmp_path, inputs):
    model, options = TINY[name](tmp_path / name)
    family = FAMILIES.get(name)
    columns = {modality: f"{modality}_in" for modality in family.modalities}
    entry = {"output": "out", "model": model, "columns": columns, **options}
    config = config_from_dict(
        {"sources": [{"path": "x", "id_column": "id"}], "output": {"path": "o"}, "encoders": [entry]}
    )
    spec = plan_encoders(config.encoders)[0]
    assert spec.family == name and family.name == name and spec.dim > 0
    encoder = family.load(spec, torch.device("cpu"))
    assert encoder.dim == spec.dim

    for modality in family.modalities:
        values = inputs[modality]
        prepared = family.prepare(spec, modality, pa.array(values))
        assert len(prepared.values) == len(prepared.errors) == len(values)
        assert prepared.errors[0] is None and prepared.errors[1] is None and prepared.errors[3] is None
        assert prepared.errors[2] is not None and error_code(prepared.errors[2]) in ERROR_CODES
        result = encoder(modality, prepared.values)
        assert isinstance(result, EncodeResult)
        assert result.vectors.shape == (len(values), spec.dim) and result.vectors.dtype == np.float32
        assert result.valid.tolist() == [True, False, False, True]
        assert np.isfinite(result.vectors[result.valid]).all()
        assert np.abs(result.vectors[result.valid]).sum(axis=1).min() > 0

        declared = {extra.name for extra in family.extra_columns(spec, modality)}
        assert set(result.extras) == declared, "extras must be exactly the columns the family declares"
        for extra in declared:
            assert len(result.extras[extra]) == len(values)

        # A row's vector does not depend on the rows batched with it.
        alone = encoder(modality, family.prepare(spec, modality, pa.array([values[3]])).values)
        assert np.allclose(alone.vectors[0], result.vectors[3], atol=1e-4)
