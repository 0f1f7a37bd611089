"""hf-audio: Hugging Face audio encoders, AST and wav2vec2 / HuBERT.

Prepare (CPU task, encoders/audio/prepare.py): decode, mono, resample to the extractor's
``sampling_rate``, cap at ``max_windows`` windows. Encode (actor, encoders/audio/windows.py):
windows of the model's length (``preprocessing.window_seconds``, declared from the folder;
``hop_seconds``) cut on the device, the front end of encoders/audio/features.py there, the
model, one vector per window, then the windows of a clip pooled (``window_pooling``, mean by
default; with ``normalize`` the window vectors are L2-normalized before and the clip vector
after). The window count goes to ``<output>_windows``.

hf-audio, by the folder's ``config.json`` model_type:
  - ``audio-spectrogram-transformer``: Kaldi fbank -> ``ASTModel``; ``pooling: cls`` is the
    model's pooler output (the mean of its CLS and distillation tokens, what AST's classifier
    reads), ``mean`` the mean of the patch tokens. Window: the samples that give ``max_length``
    frames (10.24 s for the AudioSet checkpoints).
  - ``wav2vec2`` / ``hubert``: the normalized raw waveform -> ``AutoModel``; the last hidden
    state mean-pooled over the frames that real samples produced. Models whose extractor has no
    ``return_attention_mask`` (group-norm ones such as wav2vec2-base) were not trained with
    padding, so only windows of equal length share a forward: a clip's vector never depends on
    its batch. Window: 10 s unless ``preprocessing: {window_seconds: ...}`` says otherwise.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa
import torch

from encoders.audio import HF_AUDIO_KINDS as AUDIO_KINDS
from encoders.audio.family import AudioFamily
from encoders.audio.features import (
    FBANK_FRAME_MS,
    HF_WINDOW_OPTIONS,
    front_end_from_options,
    front_end_options,
    load_feature_extractor,
    resolve_window_options,
)
from encoders.audio.windows import WindowEncoder
from encoders.core.device import autocast
from encoders.core.probe import spec_with_dim
from encoders.core.spec import EncodeResult, EncoderSpec, SpecRequest, validate_options

AST_POOLING = ("cls", "mean")
HF_AUDIO_OPTIONS = {"pooling": (str, None), "normalize": (bool, False), **HF_WINDOW_OPTIONS}


@functools.lru_cache(maxsize=16)
def _model_type(path: str) -> str:
    try:
        return str(json.loads((Path(path) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def _receptive_field_seconds(path: str, rate: int) -> float:
    """The fewest samples a wav2vec2-style convolutional feature encoder turns into one frame."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    field, stride = 1, 1
    for kernel, step in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * stride
        stride *= step
    return field / rate


class HFAudioFamily(AudioFamily):
    name = "hf-audio"

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        opts = validate_options(request.options, HF_AUDIO_OPTIONS, self.name)
        model_type = _model_type(request.weights.path)
        if model_type not in AUDIO_KINDS:
            raise ValueError(f"model_type {model_type!r} is not an hf-audio model; supported: {', '.join(AUDIO_KINDS)}")
        kind = AUDIO_KINDS[model_type]
        opts["front_end_kind"] = kind
        opts["front_end"] = front_end_options(kind, load_feature_extractor(request.weights.path))
        valid_pooling = AST_POOLING if kind == "ast" else ("mean",)
        opts["pooling"] = opts["pooling"] or valid_pooling[0]
        if opts["pooling"] not in valid_pooling:
            raise ValueError(
                f"pooling {opts['pooling']!r} is not supported for {model_type}; valid modes: "
                f"{', '.join(valid_pooling)}"
            )
        rate = opts["front_end"]["sampling_rate"]
        if kind == "ast":
            window = front_end_from_options(kind, opts["front_end"]).window_samples / rate
            resolve_window_options(opts, rate, window, FBANK_FRAME_MS / 1000)
        else:
            resolve_window_options(opts, rate, None, _receptive_field_seconds(request.weights.path, rate))
        return spec_with_dim(self, request, opts, pooling=opts["pooling"])

    def meta_dim(self, spec: EncoderSpec) -> int | None:
        return _config_dim(spec)

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFAudioEncoder":
        return HFAudioEncoder(spec, device)


class HFAudioEncoder(WindowEncoder):
    """The model half of hf-audio: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import AutoModel

        super().__init__(spec, device)
        self.kind = spec.options["front_end_kind"]
        self.front = front_end_from_options(self.kind, spec.options["front_end"])
        self.masked = self.kind == "waveform" and self.front.return_attention_mask
        self.exact_lengths = self.kind == "waveform" and not self.masked
        self.model = AutoModel.from_pretrained(spec.weights.path, dtype=torch.float32).eval().to(device)
        self._check_dim(spec)

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> EncodeResult:
        return self.encode_audio(values)

    def _embed(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.kind == "ast":
            features = self.front(waves, lengths)  # (w, max_length, mels), float32
            with autocast(self.device, self.precision):
                out = self.model(input_values=features)
            if self.options["pooling"] == "cls":
                return out.pooler_output.float()  # (CLS + distillation) / 2
            return out.last_hidden_state[:, 2:].float().mean(1)  # the patch tokens
        inputs = self.front(waves, lengths)  # (w, samples)
        mask = (torch.arange(inputs.shape[1], device=inputs.device)[None] < lengths[:, None]).long()
        with autocast(self.device, self.precision):
            hidden = self.model(input_values=inputs, attention_mask=mask if self.masked else None).last_hidden_state
        frames = self.model._get_feat_extract_output_lengths(lengths)  # (w,) frames from real samples
        valid = (torch.arange(hidden.shape[1], device=hidden.device)[None] < frames[:, None]).unsqueeze(-1)
        return (hidden.float() * valid).sum(1) / frames[:, None].clamp(min=1).float()


def _config_dim(spec: EncoderSpec) -> int | None:
    """D from the config, where it is exact: every pooling here (CLS + distillation token, mean
    of patch tokens, masked mean of frames) keeps the width of ``last_hidden_state``."""
    from transformers import AutoConfig

    width = getattr(AutoConfig.from_pretrained(spec.weights.path), "hidden_size", None)
    return width if isinstance(width, int) and width > 0 else None
