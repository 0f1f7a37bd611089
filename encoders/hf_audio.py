"""Hugging Face audio encoders: AST and wav2vec2 / HuBERT (hf-audio), and CLAP's shared
text-audio space (hf-clap).

Prepare (CPU task, encoders/audio.py): decode, mono, resample to the extractor's
``sampling_rate``, cap at ``max_windows`` windows. Encode (actor): windows of the model's length
(``preprocessing.window_seconds``, declared from the folder; ``hop_seconds``) cut on the device,
the front end of encoders/audio_features.py there, the model, one vector per window, then the
windows of a clip pooled (``window_pooling``, mean by default; with ``normalize`` the window
vectors are L2-normalized before and the clip vector after). The window count goes to
``<output>_windows``.

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
hf-clap: ``columns: {text: ..., audio: ...}``; the text and audio projections (what
``get_text_features`` / ``get_audio_features`` return), L2-normalized by default as CLAP
compares them. Windows are at most the extractor's ``max_length_s`` (10 s), so its random
fusion crops never apply (see encoders/audio_features.py).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from encoders.audio import AUDIO_OPTIONS as AUDIO_PREP_OPTIONS
from encoders.audio import (DEFAULT_MIN_SECONDS, AudioPreprocess, audio_batch, pool_windows, prepare_audio,
                            validate_window_pooling)
from encoders.audio_features import FBANK_FRAME_MS, front_end_from_options, front_end_options, load_feature_extractor
from encoders.device import autocast, resolve_precision
from encoders.hf_text import pad_sequences
from encoders.probe import spec_with_dim
from encoders.registry import FAMILIES, MODEL_TYPE_FAMILIES
from encoders.spec import EncoderSpec, Prepared, validate_options
from encoders.weights import ResolvedWeights

# config.json model_type -> front end kind
AUDIO_KINDS = {"audio-spectrogram-transformer": "ast", "wav2vec2": "waveform", "hubert": "waveform"}
AST_POOLING = ("cls", "mean")
DEFAULT_WAVEFORM_WINDOW_S = 10.0  # wav2vec2 / HuBERT declare no length; 10 s as AST and CLAP

_COMMON_OPTIONS: dict[str, tuple[Any, Any]] = {
    **AUDIO_PREP_OPTIONS,  # preprocessing, hop_seconds, max_windows, window_pooling
    "precision": (str, "auto"),
    "micro_batch": (int, 8),
}
AUDIO_OPTIONS = {"pooling": (str, None), "normalize": (bool, False), **_COMMON_OPTIONS}
CLAP_OPTIONS = {"normalize": (bool, True), "max_length": (int, None), "max_chars": (int, 1_000_000), **_COMMON_OPTIONS}


@functools.lru_cache(maxsize=16)
def _model_type(path: str) -> str:
    try:
        return str(json.loads((Path(path) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def _resolve_audio_options(opts: dict[str, Any], rate: int, model_window_s: float | None, min_seconds: float) -> None:
    """The ``preprocessing`` the model declares (its rate, its window length, the shortest clip it
    can take), with the user's keys over it; then the window and batch options checked."""
    declared = {"sample_rate": rate, "window_seconds": model_window_s or DEFAULT_WAVEFORM_WINDOW_S,
                "min_seconds": max(DEFAULT_MIN_SECONDS, min_seconds)}
    opts["preprocessing"] = {**declared, **(opts["preprocessing"] or {})}
    prep = AudioPreprocess.from_options(opts)
    if prep.sample_rate != rate:
        raise ValueError(f"preprocessing.sample_rate {prep.sample_rate} is not the model's rate {rate}")
    if model_window_s is not None and prep.window_seconds > model_window_s:
        raise ValueError(f"preprocessing.window_seconds {prep.window_seconds} is longer than the model takes ({model_window_s:g} s)")
    if prep.min_seconds < min_seconds:
        raise ValueError(f"preprocessing.min_seconds {prep.min_seconds} is shorter than the model can take ({min_seconds:g} s)")
    opts["preprocessing"] = prep.as_dict()
    opts["hop_seconds"], opts["max_windows"] = prep.hop_seconds, prep.max_windows
    validate_window_pooling(opts["window_pooling"])
    if opts["micro_batch"] < 1:
        raise ValueError("option micro_batch: must be >= 1")
    resolve_precision(torch.device("cpu"), opts["precision"])  # validates the name


def _receptive_field_seconds(path: str, rate: int) -> float:
    """The fewest samples a wav2vec2-style convolutional feature encoder turns into one frame."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    field, stride = 1, 1
    for kernel, step in zip(config.conv_kernel, config.conv_stride):
        field += (kernel - 1) * stride
        stride *= step
    return field / rate


def _spec_with_probed_dim(family: Any, output: str, columns: Mapping[str, str], weights: ResolvedWeights,
                          opts: dict[str, Any], dim: int | None) -> EncoderSpec:
    from encoders.weights import weights_sha256

    sha = weights_sha256(weights.path)
    # hidden_size / projection_dim are not trusted: one probe, cached per model
    return spec_with_dim(family, output, columns, weights, sha, opts, dim, pooling=opts.get("pooling"))


class HFAudioFamily:
    name = "hf-audio"
    modalities = ("audio",)

    def build_spec(self, output: str, columns: Mapping[str, str], weights: ResolvedWeights,
                   options: Mapping[str, Any], dim: int | None) -> EncoderSpec:
        opts = validate_options(options, AUDIO_OPTIONS, self.name)
        model_type = _model_type(weights.path)
        if model_type not in AUDIO_KINDS:
            raise ValueError(f"model_type {model_type!r} is not an hf-audio model; supported: {', '.join(AUDIO_KINDS)}")
        kind = AUDIO_KINDS[model_type]
        opts["front_end_kind"] = kind
        opts["front_end"] = front_end_options(kind, load_feature_extractor(weights.path))
        valid_pooling = AST_POOLING if kind == "ast" else ("mean",)
        opts["pooling"] = opts["pooling"] or valid_pooling[0]
        if opts["pooling"] not in valid_pooling:
            raise ValueError(f"pooling {opts['pooling']!r} is not supported for {model_type}; valid modes: {', '.join(valid_pooling)}")
        rate = opts["front_end"]["sampling_rate"]
        if kind == "ast":
            window = front_end_from_options(kind, opts["front_end"]).window_samples / rate
            _resolve_audio_options(opts, rate, window, FBANK_FRAME_MS / 1000)
        else:
            _resolve_audio_options(opts, rate, None, _receptive_field_seconds(weights.path, rate))
        return _spec_with_probed_dim(self, output, columns, weights, opts, dim)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        return _prepare_windows(spec, values)

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFAudioEncoder":
        return HFAudioEncoder(spec, device)


class HFClapFamily:
    """CLAP: text and audio into one space. Text is tokenized by the folder's tokenizer
    (truncated to the model's positions); audio takes the folder's feature-extractor settings."""

    name = "hf-clap"
    modalities = ("text", "audio")

    def build_spec(self, output: str, columns: Mapping[str, str], weights: ResolvedWeights,
                   options: Mapping[str, Any], dim: int | None) -> EncoderSpec:
        from transformers import AutoConfig

        from encoders.hf_text import load_tokenizer

        opts = validate_options(options, CLAP_OPTIONS, self.name)
        opts["front_end_kind"] = "clap"
        opts["front_end"] = front_end_options("clap", load_feature_extractor(weights.path))
        text = AutoConfig.from_pretrained(weights.path).text_config
        # RoBERTa positions start after the padding index.
        limits = [int(text.max_position_embeddings) - int(text.pad_token_id or 0) - 1,
                  getattr(load_tokenizer(weights.path, False), "model_max_length", None)]
        limit = min(v for v in limits if isinstance(v, int) and 0 < v < 1_000_000)
        opts["max_length"] = opts["max_length"] or limit
        if not 2 < opts["max_length"] <= limit:
            raise ValueError(f"max_length {opts['max_length']} is out of range; the model takes 3 to {limit} tokens")
        front = opts["front_end"]
        _resolve_audio_options(opts, front["sampling_rate"], front["nb_max_samples"] / front["sampling_rate"], 0.0)
        return _spec_with_probed_dim(self, output, columns, weights, opts, dim)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        if modality == "audio":
            return _prepare_windows(spec, values)
        from encoders.hf_text import load_tokenizer, tokenize_texts

        text_options = {"max_chars": spec.options["max_chars"], "lowercase": False, "max_length": spec.options["max_length"],
                        "prefix": "", "long_text": "truncate"}
        return tokenize_texts(load_tokenizer(spec.weights.path, False), values.to_pylist(), text_options)

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFClapEncoder":
        return HFClapEncoder(spec, device)


def _prepare_windows(spec: EncoderSpec, values: pa.Array) -> Prepared:
    return prepare_audio(values, AudioPreprocess.from_options(spec.options))


class _WindowEncoder:
    """Shared by both encoders: prepared clips -> windows on the device -> micro-batched
    forwards -> window vectors pooled per clip."""

    options: Mapping[str, Any]
    device: torch.device
    dim: int
    exact_lengths = False  # True: only windows with the same number of real samples share a forward

    def _embed(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(w, samples) windows on the device (zeros past each length), (w,) lengths -> (w, d) float32."""
        raise NotImplementedError

    def _check_dim(self, spec: EncoderSpec) -> None:
        prep = AudioPreprocess.from_options(spec.options)
        probe = torch.zeros((1, prep.window_samples), dtype=torch.float32, device=self.device)  # silence
        with torch.inference_mode():
            self.dim = int(self._embed(probe, torch.tensor([prep.window_samples], device=self.device)).shape[1])
        if spec.dim and spec.dim != self.dim:
            raise RuntimeError(f"encoder {spec.output!r}: model gives {self.dim}-d vectors, but the plan expected {spec.dim}")

    def encode_audio(self, values: pa.Array) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        batch = audio_batch(values, AudioPreprocess.from_options(self.options), self.device)
        lengths = torch.from_numpy(batch.window_lengths()).to(self.device)  # (W,)
        vectors = torch.zeros((batch.n_windows, self.dim), dtype=torch.float32, device=self.device)
        step = self.options["micro_batch"]
        with torch.inference_mode():
            for start in range(0, batch.n_windows, step):
                waves, stop = batch.windows(start, start + step), min(start + step, batch.n_windows)  # (w, window)
                for index in _same_length_groups(lengths[start:stop]) if self.exact_lengths else [None]:
                    if index is None:
                        longest = int(lengths[start:stop].max())
                        vectors[start:stop] = self._embed(waves[:, :longest], lengths[start:stop])
                    else:
                        n = int(lengths[start + index[0]])
                        vectors[start + index] = self._embed(waves[index, :n], lengths[start + index])
            if self.options["normalize"]:
                vectors = torch.nn.functional.normalize(vectors, dim=1)
            pooled = pool_windows(vectors, batch.window_rows, len(batch.valid), self.options["window_pooling"])
            if self.options["normalize"]:
                pooled = torch.nn.functional.normalize(pooled, dim=1)
        valid = batch.valid & (batch.counts > 0)
        return pooled.cpu().numpy(), valid, {"windows": batch.counts.astype(np.int64)}


def _same_length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Indices into ``lengths`` grouped by value: windows that can share a forward unpadded."""
    return [torch.nonzero(lengths == n).flatten() for n in torch.unique(lengths)]


class HFAudioEncoder(_WindowEncoder):
    """The model half of hf-audio: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import AutoModel

        self.options = spec.options
        self.device = device
        self.precision = resolve_precision(device, spec.options["precision"])
        self.kind = spec.options["front_end_kind"]
        self.front = front_end_from_options(self.kind, spec.options["front_end"])
        self.masked = self.kind == "waveform" and self.front.return_attention_mask
        self.exact_lengths = self.kind == "waveform" and not self.masked
        self.model = AutoModel.from_pretrained(spec.weights.path, dtype=torch.float32).eval().to(device)
        self._check_dim(spec)

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> tuple[Any, ...]:
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


class HFClapEncoder(_WindowEncoder):
    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import ClapModel

        from encoders.hf_text import load_tokenizer

        self.options = spec.options
        self.device = device
        self.precision = resolve_precision(device, spec.options["precision"])
        self.front = front_end_from_options("clap", spec.options["front_end"])
        self.model = ClapModel.from_pretrained(spec.weights.path, dtype=torch.float32).eval().to(device)
        self.filters = self.front.mel_filters(device)
        self.channels = 4 if self.model.config.audio_config.enable_fusion else 1
        tokenizer = load_tokenizer(spec.weights.path, False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._check_dim(spec)

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> tuple[Any, ...]:
        if modality == "audio":
            return self.encode_audio(values)
        rows = values.to_pylist()
        valid = np.array([r is not None for r in rows], dtype=bool)
        sequences = [r[0] for r in rows if r is not None]
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        step = self.options["micro_batch"] * 8  # text is far cheaper than 10 s of audio
        vectors = [self._text(sequences[s:s + step]) for s in range(0, len(sequences), step)]
        if vectors:
            features = torch.cat(vectors)
            if self.options["normalize"]:
                features = torch.nn.functional.normalize(features, dim=1)
            out[valid] = features.numpy()
        return out, valid

    def _embed(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        features = self.front(waves, lengths, self.filters, self.channels)  # (w, channels, frames, mels)
        # No window is longer than the model's length, so none takes the fusion branch.
        is_longer = torch.zeros((features.shape[0], 1), dtype=torch.bool, device=features.device)
        with autocast(self.device, self.precision):
            pooled = self.model.audio_model(input_features=features, is_longer=is_longer).pooler_output
            return self.model.audio_projection(pooled).float()

    def _text(self, sequences: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_sequences(sequences, self.pad_id)
        with torch.inference_mode(), autocast(self.device, self.precision):
            pooled = self.model.text_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).pooler_output
            return self.model.text_projection(pooled).float().cpu()


FAMILIES.register(HFAudioFamily.name, HFAudioFamily())
FAMILIES.register(HFClapFamily.name, HFClapFamily())
for _audio_type in AUDIO_KINDS:
    MODEL_TYPE_FAMILIES[_audio_type] = HFAudioFamily.name
MODEL_TYPE_FAMILIES["clap"] = HFClapFamily.name
