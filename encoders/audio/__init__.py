"""Audio families and their model aliases, registered by name: nothing heavy is imported here.

- ``hf-audio`` (hf_audio.py): AST, wav2vec2 and HuBERT folders, with on-device front ends
  (features.py).
- ``audio-speaker`` (speaker.py): resemblyzer's GE2E speaker encoder.
- ``audio-sfx`` (sfx.py): aiSFX's sound-effects CNN.
Prepare (decode, mono, resample, cap): prepare.py; windows on the device and pooling: windows.py.
"""

from encoders.core.registry import ModelAlias, register_family, register_model

# config.json model_type -> hf-audio front end kind (hf_audio.py reads it too).
HF_AUDIO_KINDS = {"audio-spectrogram-transformer": "ast", "wav2vec2": "waveform", "hubert": "waveform"}

register_family("hf-audio", "encoders.audio.hf_audio:HFAudioFamily", model_types=tuple(HF_AUDIO_KINDS))
register_family("audio-speaker", "encoders.audio.speaker:SpeakerFamily")
register_family("audio-sfx", "encoders.audio.sfx:SFXFamily")

# resemblyzer's GE2E speaker encoder (256-d), weights from the PyPI package (installed with
# --no-deps: its declared dependencies do not install). Its own conventions, from resemblyzer's
# hparams.py and VoiceEncoder.embed_utterance: 16 kHz, 1.6 s partials every 0.77 s (rate 1.3),
# the last kept when >= 75% audio; power mels (25 ms / 10 ms, 40 Slaney mels) after -30 dBFS.
register_model(
    ModelAlias(
        name="resemblyzer",
        family="audio-speaker",
        hub_id="resemblyzer",
        dim=256,
        bundled="resemblyzer/pretrained.pt",
        defaults={
            "preprocessing": {"sample_rate": 16000, "window_seconds": 1.6, "min_seconds": 0.5, "min_coverage": 0.75},
            "hop_seconds": 0.77,
            "max_windows": 64,
            "features": {"n_fft": 400, "hop_length": 160, "n_mels": 40, "target_dbfs": -30.0},
        },
    )
)
# aiSFX's sound-effects CNN (512-d), weights from the PyPI package (installed with --no-deps: it
# pins numpy 1.23). Its conventions, from aisfx/inference.py and spectrogram_librosa.py: 44.1 kHz,
# blocks of 100 frames (2048-sample FFT, hop 1024) every 50 frames, incomplete blocks dropped;
# 96 HTK mels (unit-sum filters), log10(10000 x + 1), scaled by the paper's range (0, 9.4578).
register_model(
    ModelAlias(
        name="aisfx",
        family="audio-sfx",
        hub_id="aisfx",
        dim=512,
        bundled="aisfx/models/checkpoint.pth",
        defaults={
            "preprocessing": {
                "sample_rate": 44100,
                "window_seconds": 102400 / 44100,
                "min_seconds": 0.1,
                "min_coverage": 0.99,
            },
            "hop_seconds": 51200 / 44100,
            "max_windows": 32,
            "features": {
                "n_fft": 2048,
                "hop_length": 1024,
                "n_mels": 96,
                "f_min": 0.0,
                "f_max": 22050.0,
                "log_gain": 10000.0,
                "norm_min": 0.0,
                "norm_max": 9.457798957824707,
            },
        },
    )
)
