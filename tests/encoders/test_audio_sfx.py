"""audio-sfx with aiSFX's real bundled weights: fidelity against aiSFX's own network class and
block/normalization functions on the same prepared waveform, the on-device log-mel against
librosa, the window plan against aiSFX's blocking, and the alias resolving offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES, MODELS
from encoders.audio.prepare import AudioPreprocess, waveforms_to_arrow
from encoders.audio.windows import audio_batch, plan_windows
from pipeline.config import config_from_dict
from pipeline.plan import plan_encoders
from tests.audio_data import ALSA_CLIPS, SENTENCES, sox, speak, write_long_wav

pytest.importorskip("aisfx", reason="pip install --no-deps aisfx==0.1.2")


def plan_one(**options):
    config = config_from_dict(
        {
            "sources": [{"path": "x", "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [{"output": "sfx", "column": "audio", "model": "aisfx", **options}],
        }
    )
    return plan_encoders(config.encoders)[0]


@pytest.fixture(scope="module")
def sfx():
    spec = plan_one()
    return spec, FAMILIES.get(spec.family).load(spec, torch.device("cpu"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
    """Shorter than a block (ALSA noise and speech, 1.4 s), speech, 48 kHz stereo, and 40 s
    that the 32-block cap cuts."""
    folder = tmp_path_factory.mktemp("sfx")
    speech = speak(folder / "speech.wav", SENTENCES[1], "en+f2")
    found = [ALSA_CLIPS / "Noise.wav", ALSA_CLIPS / "Front_Center.wav"]
    return [str(c) for c in found if c.exists()] + [
        str(speech),
        str(sox(speech, folder / "stereo48k.wav", rate=48000, channels=2)),
        str(write_long_wav(folder / "long.wav", 40, rate=44100, channels=1)),
    ]


@pytest.fixture(scope="module")
def aisfx_model():
    """aiSFX's own CrossNet class (aisfx.inference.load_bestModel) with the bundled checkpoint."""
    from aisfx.inference import load_bestModel
    from numpy._core.multiarray import scalar

    with torch.serialization.safe_globals([(scalar, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Int64DType]):
        weights, datasets = torch.load(plan_one().weights.path, map_location="cpu", weights_only=True)
    return load_bestModel(weights, datasets, "cpu")


def aisfx_power_mel(wave: np.ndarray) -> np.ndarray:
    """aiSFX's librosa spectrogram parameters (spectrogram_librosa.py): htk mels with unit-sum
    filters, power 2, 2048-sample frames every 1024 -> (96, frames)."""
    import librosa

    return librosa.feature.melspectrogram(
        y=wave,
        sr=44100,
        n_mels=96,
        norm=1.0,
        fmin=0.0,
        fmax=22050.0,
        htk=True,
        power=2.0,
        hop_length=1024,
        win_length=2048,
    )


def aisfx_reference(model, wave: np.ndarray, max_blocks: int) -> tuple[np.ndarray, int]:
    """aiSFX's own pipeline on a 44.1 kHz waveform: its librosa spectrogram parameters (peak
    normalization, htk mels with unit-sum filters, log10(1e4 x + 1)), its normalization and
    blocking functions, its CrossNet class with the checkpoint -> (mean block vector, blocks)."""
    from aisfx.preprocessing import blocking, compute_hopSize, spectrogram_normalize

    peak = np.max(np.abs(wave))
    wave = wave / (peak if peak else 1)
    spec = aisfx_power_mel(wave)
    spec = spectrogram_normalize(np.log10(spec * 10000.0 + 1), spec_norm="original").T  # (frames, mels)
    blocks = blocking(spec, block_size=100, hop_size=compute_hopSize(100, 0.5, spec), drop_partial_block=True)
    with torch.no_grad():
        vectors = model.get_embedding(torch.Tensor(blocks[:max_blocks])).numpy()
    return vectors.mean(axis=0), len(vectors)


def test_alias_resolves_offline_with_dim_from_the_registry():
    spec = plan_one()
    assert spec.dim == MODELS.get("aisfx").dim == 512 and spec.family == "audio-sfx"
    assert spec.weights.source == "bundled" and spec.weights.revision == "aisfx==0.1.2"
    assert Path(spec.weights.path).name == "checkpoint.pth"
    prep = AudioPreprocess.from_options(spec.options)
    assert (prep.sample_rate, prep.window_samples, prep.hop_samples) == (44100, 102400, 51200)


def test_window_plan_is_aisfx_blocking():
    """aiSFX's block count over librosa's 1 + n // 1024 frames (100-frame blocks, hop 50,
    incomplete blocks dropped) for every length, capped at max_windows."""
    prep = AudioPreprocess.from_options(MODELS.get("aisfx").defaults)
    for n in range(1000, 2_000_000, 311):
        frames = 1 + n // 1024
        blocks = int(np.ceil((frames - 100) / 50 + 1)) - (1 if (frames - 100) % 50 else 0)
        assert plan_windows(n, prep).tolist() == list(np.arange(min(max(blocks, 1), 32)) * 51200), n


def test_fidelity_against_aisfx(sfx, aisfx_model, clips):
    pytest.importorskip("librosa", reason="extra 'dev' not installed")
    spec, encoder = sfx
    # Its 8 batch norms run folded into their convolutions (encoders/core/fold.py): the
    # reference below is aiSFX's own network, batch norms and all.
    assert encoder.folded == 8 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.net.modules())
    prepared = FAMILIES.get(spec.family).prepare(spec, "audio", pa.array(clips))
    result = encoder("audio", prepared.values)
    vectors, valid, extras = result.vectors, result.valid, result.extras
    assert valid.all() and vectors.shape == (len(clips), 512)
    cosines = []
    for vector, count, wave in zip(vectors, extras["windows"], prepared.values.to_pylist()):
        reference, blocks = aisfx_reference(aisfx_model, np.asarray(wave, np.float32), 32)
        assert count == blocks
        cosines.append(float(vector @ reference / np.linalg.norm(vector) / np.linalg.norm(reference)))
    print(f"aisfx fidelity cosines: min {min(cosines):.7f} over {len(cosines)} clips")
    assert min(cosines) >= 0.9999
    assert extras["windows"][-1] == 32


def test_log_mel_matches_librosa(sfx, clips):
    """|torch - librosa| <= 1e-4 on the scaled log-mel (values in 0..~1; measured ~4e-5: float32
    rounding of the power spectrum, amplified by log10(1e4 x + 1) at low power)."""
    pytest.importorskip("librosa", reason="extra 'dev' not installed")
    spec, encoder = sfx
    prep = AudioPreprocess.from_options(spec.options)
    wave = np.asarray(
        FAMILIES.get(spec.family).prepare(spec, "audio", pa.array(clips[-1:])).values[0].as_py(), np.float32
    )
    wave = wave / np.abs(wave).max()
    batch = audio_batch(waveforms_to_arrow([wave]), prep)
    with torch.inference_mode():
        ours = encoder.log_mels(batch.windows(context=encoder.context)).numpy()  # (w, 100, 96)
    mel = aisfx_power_mel(wave)
    reference = (np.log10(mel * 10000.0 + 1) / 9.457798957824707).T  # (frames, 96)
    reference = np.stack([reference[s // 1024 : s // 1024 + 100] for s in batch.window_starts])
    worst = float(np.abs(ours - reference).max())
    print(f"aisfx log-mel: max |torchaudio - librosa| = {worst:.2e}")
    assert worst <= 1e-4


def test_silence_null_and_bad_rows(sfx, tmp_path):
    """Digital silence (peak 0: no gain) gets a finite vector; a null stays absent; a bad file
    is an error value; the rows stay aligned."""
    import soundfile as sf

    spec, encoder = sfx
    sf.write(tmp_path / "silence.wav", np.zeros(44100 * 3, np.float32), 44100)
    (tmp_path / "text.wav").write_text("not audio")
    values = [str(tmp_path / "silence.wav"), None, str(tmp_path / "text.wav")]
    prepared = FAMILIES.get(spec.family).prepare(spec, "audio", pa.array(values))
    result = encoder("audio", prepared.values)
    vectors, valid, extras = result.vectors, result.valid, result.extras
    assert valid.tolist() == [True, False, False] and np.isfinite(vectors[0]).all()
    assert prepared.errors[1] is None and prepared.errors[2].startswith("decode_failed")
    assert extras["windows"].tolist() == [1, 0, 0]
