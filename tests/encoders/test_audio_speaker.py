"""audio-speaker with resemblyzer's real bundled weights: fidelity against resemblyzer's own
VoiceEncoder on the same prepared waveform, the on-device mel against its librosa mel, speaker
separation on espeak-ng voices, bad audio, and the alias resolving offline through the planner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES, MODELS
from encoders.audio.prepare import AudioPreprocess, waveforms_to_arrow
from encoders.audio.windows import audio_batch, plan_windows
from encoders.core.errors import error_code
from pipeline.config import ConfigError, config_from_dict
from pipeline.plan import plan_encoders
from tests.audio_data import ALSA_CLIPS, SENTENCES, VOICES, sox, speak, speech_corpus, write_bad_files, write_long_wav

pytest.importorskip("resemblyzer", reason="pip install --no-deps resemblyzer==0.1.4 (README install)")


def plan_one(model: str = "resemblyzer", **options):
    config = config_from_dict(
        {
            "sources": [{"path": "x", "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [{"output": "voice", "column": "audio", "model": model, **options}],
        }
    )
    return plan_encoders(config.encoders)[0]


@pytest.fixture(scope="module")
def speaker():
    spec = plan_one()
    return spec, FAMILIES.get(spec.family).load(spec, torch.device("cpu"))


@pytest.fixture(scope="module")
def voice_encoder():
    """resemblyzer's own model (needs librosa and webrtcvad-wheels beside it: extra 'dev')."""
    pytest.importorskip("librosa", reason="extra 'dev' not installed")
    pytest.importorskip("webrtcvad", reason="extra 'dev' (webrtcvad-wheels) not installed")
    from resemblyzer import VoiceEncoder

    return VoiceEncoder("cpu", verbose=False)


def embed(spec, encoder, values: list):
    prepared = FAMILIES.get(spec.family).prepare(spec, "audio", pa.array(values))
    result = encoder("audio", prepared.values)
    vectors, valid, extras = result.vectors, result.valid, result.extras
    return vectors, valid, extras["windows"], prepared


def test_alias_resolves_offline_with_dim_from_the_registry():
    alias = MODELS.get("resemblyzer")
    assert alias.family == "audio-speaker" and alias.dim == 256
    spec = plan_one()
    assert spec.dim == 256 and spec.family == "audio-speaker"
    assert spec.weights.source == "bundled" and spec.weights.revision == "Resemblyzer==0.1.4"
    assert spec.weights.reference == "resemblyzer" and Path(spec.weights.path).name == "pretrained.pt"
    prep = AudioPreprocess.from_options(spec.options)
    assert (prep.sample_rate, prep.window_samples, prep.hop_samples) == (16000, 25600, 12320)
    # Planning and loading never import the resemblyzer package (its dependencies do not install).
    code = (
        "import sys, torch\n"
        "from encoders import FAMILIES\n"
        "from pipeline.config import config_from_dict\n"
        "from pipeline.plan import plan_encoders\n"
        "config = config_from_dict({'sources': [{'path': 'x', 'id_column': 'id'}], 'output': {'path': 'o'},\n"
        "    'encoders': [{'output': 'voice', 'column': 'audio', 'model': 'resemblyzer'}]})\n"
        "spec = plan_encoders(config.encoders)[0]\n"
        "FAMILIES.get(spec.family).load(spec, torch.device('cpu'))\n"
        "assert 'resemblyzer' not in sys.modules, 'resemblyzer was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_options_are_validated():
    with pytest.raises(ConfigError, match="window_pooling"):
        plan_one(window_pooling="median")
    with pytest.raises(ConfigError, match="unknown option 'pooling_mode'"):
        plan_one(pooling_mode="mean")
    with pytest.raises(ConfigError, match="hop_seconds"):
        plan_one(hop_seconds=0)


def test_window_plan_is_resemblyzers_partials():
    from resemblyzer.voice_encoder import VoiceEncoder

    prep = AudioPreprocess.from_options(MODELS.get("resemblyzer").defaults)
    for n in [*range(8000, 120_000, 97), *range(prep.max_samples - 3000, prep.max_samples + 3000, 41)]:
        slices, _ = VoiceEncoder.compute_partial_slices(n, rate=1.3, min_coverage=0.75)
        assert plan_windows(n, prep).tolist() == [s.start for s in slices][: prep.max_windows], n


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory) -> list[str]:
    """Speech in four voices, the ALSA voice clips (48 kHz), a 48 kHz stereo and an 8 kHz
    conversion, and a 70 s clip that the 64-partial cap cuts."""
    folder = tmp_path_factory.mktemp("speech")
    clips = [speak(folder / f"{i}.wav", SENTENCES[i], voice) for i, voice in enumerate(VOICES[:4])]
    clips += [ALSA_CLIPS / "Front_Center.wav", ALSA_CLIPS / "Rear_Left.wav"]
    clips.append(sox(clips[0], folder / "stereo48k.wav", rate=48000, channels=2))
    clips.append(sox(clips[1], folder / "8k.wav", rate=8000))
    clips.append(write_long_wav(folder / "long.wav", 70, rate=22050, channels=1, source=clips[2]))
    return [str(c) for c in clips if Path(c).exists()]


def test_fidelity_against_resemblyzer(speaker, voice_encoder, real_clips):
    """Same prepared waveform: resemblyzer's embed_utterance after its normalize_volume (its VAD
    trim bypassed) vs this family's vector. fp32, cosine >= 0.9999; the same partial count."""
    from resemblyzer.audio import normalize_volume

    spec, encoder = speaker
    vectors, valid, windows, prepared = embed(spec, encoder, real_clips)
    assert valid.all()
    cosines = []
    for vector, count, wave in zip(vectors, windows, prepared.values.to_pylist()):
        wave = normalize_volume(np.asarray(wave, np.float32), -30, increase_only=True)
        reference, partials, _ = voice_encoder.embed_utterance(wave, return_partials=True)
        assert count == len(partials)
        cosines.append(float(vector @ reference / np.linalg.norm(vector) / np.linalg.norm(reference)))
    print(f"fidelity cosines: min {min(cosines):.7f} over {len(cosines)} clips")
    assert min(cosines) >= 0.9999
    assert windows[-1] == 64  # the 70 s clip: capped at max_windows partials (50.1 s)


def test_mel_matches_resemblyzers_librosa_mel(speaker, real_clips):
    """The on-device torchaudio mel of each window equals resemblyzer's librosa mel of the whole
    utterance, sliced at the partial: |torch - librosa| <= 1e-5 x the clip's peak mel value
    (measured about 2e-7: float32 FFT rounding)."""
    pytest.importorskip("librosa", reason="extra 'dev' not installed")
    from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram

    spec, encoder = speaker
    prep = AudioPreprocess.from_options(spec.options)
    prepared = FAMILIES.get(spec.family).prepare(spec, "audio", pa.array(real_clips[:6]))
    worst = 0.0
    for wave in prepared.values.to_pylist():
        wave = normalize_volume(np.asarray(wave, np.float32), -30, increase_only=True).astype(np.float32)
        batch = audio_batch(waveforms_to_arrow([wave]), prep)
        with torch.inference_mode():
            ours = encoder.mel(batch.windows(context=encoder.context)).transpose(1, 2).numpy()  # (w, 160, 40)
        starts = batch.window_starts // 160
        padded = np.pad(wave, (0, max(0, int(batch.window_starts[-1]) + 25600 - len(wave))))
        mel = wav_to_mel_spectrogram(padded)  # (frames, 40), librosa
        reference = np.stack([mel[s : s + 160] for s in starts])
        worst = max(worst, float(np.abs(ours - reference).max() / reference.max()))
    print(f"mel: max |torchaudio - librosa| / peak = {worst:.2e}")
    assert worst <= 1e-5


def test_same_voice_scores_higher_than_different_voices(speaker, tmp_path):
    """espeak-ng speech, 6 voices x 5 sentences. A comparison: for an anchor clip, one clip of the
    same voice (another sentence) and one of a different voice; it succeeds when the same-voice
    cosine is higher. All anchors, all such pairs (6*5 anchors x 4 x 25 = 3000 comparisons)."""
    spec, encoder = speaker
    corpus = speech_corpus(tmp_path, VOICES, sentences=5)
    paths = [str(p) for voice in VOICES for p in corpus[voice]]
    labels = np.repeat(np.arange(len(VOICES)), 5)
    vectors, valid, _, _ = embed(spec, encoder, paths)
    assert valid.all()
    similarity = vectors @ vectors.T
    wins = total = 0
    for anchor in range(len(paths)):
        same = similarity[anchor, (labels == labels[anchor]) & (np.arange(len(paths)) != anchor)]
        other = similarity[anchor, labels != labels[anchor]]
        wins += int((same[:, None] > other[None, :]).sum())
        total += same.size * other.size
    print(f"same voice above different voice: {wins / total:.4f} of {total} comparisons")
    assert wins / total >= 0.9


def test_bad_audio_rows(speaker, tmp_path):
    """Every bad file is an error value with a null vector; good ones (8 kHz, 48 kHz stereo,
    6 channels, FLAC/OGG/MP3, silence) get unit vectors; null stays absent; no row is lost."""
    spec, encoder = speaker
    expected = write_bad_files(tmp_path)
    names = list(expected)
    values = [str(tmp_path / n) for n in names] + [None]
    vectors, valid, windows, prepared = embed(spec, encoder, values)
    assert len(vectors) == len(valid) == len(windows) == len(prepared.errors) == len(values)
    for i, name in enumerate(names):
        code = error_code(prepared.errors[i]) if prepared.errors[i] else None
        assert code == expected[name], (name, prepared.errors[i])
        assert valid[i] == (code is None), name
        if valid[i]:
            assert np.isfinite(vectors[i]).all() and abs(np.linalg.norm(vectors[i]) - 1) < 1e-5, name
            assert windows[i] >= 1
        else:
            assert windows[i] == 0
    assert not valid[-1] and prepared.errors[-1] is None
    # The same speech through different containers and layouts is nearly the same vector.
    base = vectors[names.index("voice.wav")]
    for name, floor in (
        ("voice.flac", 0.999),
        ("48k_stereo.wav", 0.99),
        ("6ch.wav", 0.99),
        ("voice.mp3", 0.95),
        ("8k.wav", 0.9),
    ):  # 8 kHz loses everything above 4 kHz
        assert float(vectors[names.index(name)] @ base) > floor, name


def test_window_pooling_options(voice_encoder, real_clips):
    """first and max pooling (unnormalized) equal the first partial and the elementwise max of
    resemblyzer's partial vectors."""
    from resemblyzer.audio import normalize_volume

    for mode, reduce in (("first", lambda p: p[0]), ("max", lambda p: p.max(axis=0))):
        spec = plan_one(window_pooling=mode, normalize=False)
        encoder = FAMILIES.get(spec.family).load(spec, torch.device("cpu"))
        vectors, valid, windows, prepared = embed(spec, encoder, real_clips[:3])
        for vector, wave in zip(vectors, prepared.values.to_pylist()):
            wave = normalize_volume(np.asarray(wave, np.float32), -30, increase_only=True)
            _, partials, _ = voice_encoder.embed_utterance(wave, return_partials=True)
            assert np.allclose(vector, reduce(partials), atol=1e-5), mode


def test_clip_mels_equal_per_window_mels(speaker, real_clips):
    """Windows on the frame grid (the default hop, 0.77 s = 77 frames) take their frames from one
    mel of the whole clip; the per-window mel (for hops off the grid) must give the same vectors,
    and so must any micro-batch size."""
    spec, encoder = speaker
    assert encoder.shared_frames
    prepared = FAMILIES.get(spec.family).prepare(spec, "audio", pa.array(real_clips))
    batch = encoder.batch(prepared.values)
    shared = encoder.forward(batch).numpy()
    for micro_batch in (1, 7, 1000):
        assert np.allclose(encoder.forward(batch, micro_batch).numpy(), shared, atol=1e-5), micro_batch
    encoder.shared_frames = False
    try:
        per_window = encoder.forward(batch).numpy()
    finally:
        encoder.shared_frames = True
    assert np.abs(per_window - shared).max() < 1e-5

    off_grid = plan_one(hop_seconds=0.7703)  # 12324.8 samples: not a multiple of the 160-sample hop
    assert not FAMILIES.get("audio-speaker").load(off_grid, torch.device("cpu")).shared_frames
