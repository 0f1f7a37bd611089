"""The on-device front ends (encoders/audio/features.py) against the models' own feature
extractors on real speech (espeak-ng and the ALSA voice clips), at the tolerances the module
documents: AST fbank equal (the same torchaudio call), CLAP log-mel within 0.05 dB max and
1e-3 dB mean, wav2vec2 normalization within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from encoders.audio.features import ClapFrontEnd, FbankFrontEnd, WaveformFrontEnd
from tests.audio_data import SENTENCES, alsa_clips, speak

CLAP_MAX_DB, CLAP_MEAN_DB = 0.05, 1e-3


def load(path, rate: int) -> np.ndarray:
    import torchaudio.functional as AF

    wave, source_rate = sf.read(path, dtype="float32", always_2d=True)
    return AF.resample(torch.from_numpy(wave.mean(1)), source_rate, rate).numpy()


@pytest.fixture(scope="module")
def speech_path(tmp_path_factory):
    return speak(tmp_path_factory.mktemp("fe") / "speech.wav", SENTENCES[2])


def padded(clips: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows as the encoder gets them: (w, width) zeros past each clip, and the lengths."""
    waves = torch.zeros((len(clips), width))
    for i, clip in enumerate(clips):
        waves[i, : len(clip)] = torch.from_numpy(clip[:width])
    return waves, torch.tensor([min(len(c), width) for c in clips])


def test_ast_fbank_equals_the_extractor(speech_path):
    from transformers import ASTFeatureExtractor

    extractor = ASTFeatureExtractor(num_mel_bins=64, max_length=300)
    front = FbankFrontEnd.from_extractor(extractor)
    wave = load(speech_path, 16000)
    clips = [wave[: front.window_samples], wave[:20000]]  # a full window and a clip that pads frames
    ours = front(*padded(clips, front.window_samples))
    reference = extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
    assert ours.shape == reference.shape == (2, 300, 64)
    assert (ours - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("truncation,padding", [("fusion", "repeatpad"), ("rand_trunc", "repeat"), ("fusion", "pad")])
def test_clap_log_mel_within_tolerance(truncation, padding):
    from transformers import ClapFeatureExtractor

    extractor = ClapFeatureExtractor(truncation=truncation, padding=padding)  # the released 48 kHz settings
    front = ClapFrontEnd.from_extractor(extractor)
    clips = [load(path, 48000) for path in alsa_clips("Front_Center.wav", "Rear_Left.wav")]
    channels = 4 if truncation == "fusion" else 1
    ours = front(*padded(clips, front.window_samples), front.mel_filters(torch.device("cpu")), channels).numpy()
    reference = extractor(clips, sampling_rate=48000, return_tensors="np")["input_features"]
    assert ours.shape == reference.shape == (2, channels, 1001, 64)
    diff = np.abs(ours - reference)
    assert diff.max() <= CLAP_MAX_DB and diff.mean() <= CLAP_MEAN_DB


def test_waveform_normalization_matches_the_extractor(speech_path):
    from transformers import Wav2Vec2FeatureExtractor

    wave = load(speech_path, 16000)
    clips = [wave[:30000], wave[5000:17000]]
    for masked in (False, True):
        extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=masked)
        ours = WaveformFrontEnd.from_extractor(extractor)(*padded(clips, 30000))
        for i, clip in enumerate(clips):  # each clip alone: normalized over its own samples
            reference = extractor(clip, sampling_rate=16000, return_tensors="pt")["input_values"][0]
            assert (ours[i, : len(clip)] - reference).abs().max() <= 1e-5
        assert ours[1, len(clips[1]) :].abs().max() == 0  # padding stays padding_value
