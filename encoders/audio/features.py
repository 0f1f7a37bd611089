"""On-device audio front ends for Hugging Face audio models, with the parameters of the model
folder's ``preprocessor_config.json`` (read through the transformers feature-extractor class, so
its defaults apply to keys a folder leaves out).

All three take mono float32 windows already on the encoder's device, at the model's rate:

- **AST** (``ASTFeatureExtractor``): ``torchaudio.compliance.kaldi.fbank`` with the extractor's
  own arguments (hanning window, ``num_mel_bins``, 25 ms frames every 10 ms, no dither, no
  energy; ``htk_compat`` only moves the energy term, which is off), zero-padded or truncated to
  ``max_length`` frames, then ``(x - mean) / (2 * std)`` when ``do_normalize``. It is the same
  torchaudio call the extractor makes, so on CPU the features are equal (measured max |diff| 0).
- **wav2vec2 / HuBERT** (``Wav2Vec2FeatureExtractor``): the raw waveform; with ``do_normalize``
  each window gets zero mean and unit variance over its own samples (population variance +
  1e-7, as the extractor does); padding, when the model takes an attention mask, is
  ``padding_value``.
- **CLAP** (``ClapFeatureExtractor``): the extractor computes in float64 numpy; here the same
  power spectrogram (periodic Hann, ``fft_window_size``, ``hop_length``, centred with reflect
  padding) runs in float32 with ``torch.stft`` and torchaudio's mel filters (``htk``, no norm,
  for ``truncation="fusion"``; ``slaney``/``slaney`` for ``rand_trunc``), then
  ``10 * log10(max(x, 1e-10))``. Tolerance, checked by tests/encoders/test_audio_features.py:
  max |diff| <= 0.05 dB and mean |diff| <= 1e-3 dB against the extractor (measured on espeak
  speech: 0.010 dB max, 1.5e-5 dB mean; float64 on device would give 2e-4 dB max). Windows are
  cut to at most ``nb_max_samples`` before they arrive, so the extractor's random crops never
  apply: shorter windows are padded per ``padding`` (``repeatpad``: whole repeats, then zeros;
  ``repeat``; ``pad``). A model with ``enable_fusion`` gets the one spectrogram in all four
  channels, as the extractor gives it; one without fusion gets one channel (its patch embedding
  takes one, whatever the extractor's ``truncation``). The
  extractor also marks one random clip of a batch with no long clip as ``is_longer``; a window
  here is never longer than the model's length, so ``is_longer`` is always False, which makes
  the vectors deterministic and independent of the batch.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch

from encoders.audio.prepare import AUDIO_OPTIONS, DEFAULT_MIN_SECONDS, resolve_audio_options
from encoders.core.device import check_runtime_options

CLAP_PADDING = ("repeatpad", "repeat", "pad")
CLAP_TRUNCATION = ("fusion", "rand_trunc")
FBANK_FRAME_MS, FBANK_SHIFT_MS = 25.0, 10.0  # ASTFeatureExtractor keeps kaldi.fbank's defaults
DEFAULT_WAVEFORM_WINDOW_S = 10.0  # wav2vec2 / HuBERT declare no length; 10 s as AST and CLAP

# Options both Hugging Face audio families (hf-audio, hf-clap) take beside their own.
HF_WINDOW_OPTIONS: dict[str, tuple[Any, Any]] = {
    **AUDIO_OPTIONS,  # preprocessing, hop_seconds, max_windows, window_pooling
    "precision": (str, "auto"),
    "micro_batch": (int, 8),
}


@functools.lru_cache(maxsize=16)
def load_feature_extractor(path: str) -> Any:
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"the model folder has no usable preprocessor_config.json (feature extractor): "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None


_CASTS = {"int": int, "float": float, "bool": bool, "str": str}


class ExtractorFrontEnd:
    """A front end whose fields are the feature extractor's attributes of the same names (the
    extractor's defaults apply to keys a folder leaves out), cast to the field types."""

    @classmethod
    def from_extractor(cls, fe: Any) -> Any:
        return cls(**{f.name: _CASTS[f.type](getattr(fe, f.name)) for f in fields(cls)})


@dataclass(frozen=True)
class FbankFrontEnd(ExtractorFrontEnd):
    """AST: Kaldi log-mel filterbanks, (w, samples) -> (w, max_length, num_mel_bins)."""

    sampling_rate: int
    num_mel_bins: int
    max_length: int
    do_normalize: bool
    mean: float
    std: float

    @property
    def frame_samples(self) -> int:
        return int(self.sampling_rate * FBANK_FRAME_MS / 1000)

    @property
    def window_samples(self) -> int:
        """The samples that give exactly ``max_length`` frames (kaldi snip_edges framing)."""
        return self.frame_samples + (self.max_length - 1) * int(self.sampling_rate * FBANK_SHIFT_MS / 1000)

    def __call__(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from torchaudio.compliance.kaldi import fbank

        out = torch.zeros(
            (waves.shape[0], self.max_length, self.num_mel_bins), dtype=torch.float32, device=waves.device
        )
        for i, n in enumerate(lengths.tolist()):
            # kaldi.fbank takes one (1, samples) waveform at a time.
            feats = fbank(
                waves[i : i + 1, :n].float(),
                sample_frequency=self.sampling_rate,
                window_type="hanning",
                num_mel_bins=self.num_mel_bins,
                frame_length=FBANK_FRAME_MS,
                frame_shift=FBANK_SHIFT_MS,
                dither=0.0,
                use_energy=False,
                htk_compat=True,
            )  # (frames, mels)
            frames = min(feats.shape[0], self.max_length)
            out[i, :frames] = feats[:frames]  # the extractor zero-pads the log-mels, before normalizing
        if self.do_normalize:
            out = (out - self.mean) / (self.std * 2)
        return out


@dataclass(frozen=True)
class WaveformFrontEnd(ExtractorFrontEnd):
    """wav2vec2 / HuBERT: (w, samples) zero-padded -> normalized input values (same shape)."""

    sampling_rate: int
    do_normalize: bool
    return_attention_mask: bool
    padding_value: float

    def __call__(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        waves = waves.float()
        valid = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]  # (w, samples)
        if self.do_normalize:
            count = lengths[:, None].to(waves.dtype)
            mean = (waves * valid).sum(1, keepdim=True) / count
            var = (((waves - mean) * valid) ** 2).sum(1, keepdim=True) / count
            waves = (waves - mean) / torch.sqrt(var + 1e-7)
        return torch.where(valid, waves, torch.full_like(waves, self.padding_value))


@dataclass(frozen=True)
class ClapFrontEnd(ExtractorFrontEnd):
    """CLAP: log-mel (dB) spectrograms, (w, samples <= nb_max_samples) -> (w, channels, frames, mels)."""

    sampling_rate: int
    feature_size: int
    fft_window_size: int
    hop_length: int
    nb_max_samples: int
    frequency_min: float
    frequency_max: float
    truncation: str
    padding: str

    @classmethod
    def from_extractor(cls, fe: Any) -> "ClapFrontEnd":
        front = super().from_extractor(fe)
        if front.truncation not in CLAP_TRUNCATION:
            raise ValueError(
                f"CLAP truncation {front.truncation!r} is not supported; valid values: {', '.join(CLAP_TRUNCATION)}"
            )
        if front.padding not in CLAP_PADDING:
            raise ValueError(
                f"CLAP padding {front.padding!r} is not supported; valid values: {', '.join(CLAP_PADDING)}"
            )
        return front

    @property
    def window_samples(self) -> int:
        return self.nb_max_samples

    def mel_filters(self, device: torch.device) -> torch.Tensor:
        """(fft_window_size // 2 + 1, feature_size): the extractor's ``mel_filters`` (fusion) or
        ``mel_filters_slaney`` (rand_trunc)."""
        import torchaudio

        slaney = self.truncation != "fusion"
        return torchaudio.functional.melscale_fbanks(
            self.fft_window_size // 2 + 1,
            self.frequency_min,
            self.frequency_max,
            self.feature_size,
            self.sampling_rate,
            norm="slaney" if slaney else None,
            mel_scale="slaney" if slaney else "htk",
        ).to(device)

    def pad(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(w, samples) zero-padded windows -> (w, nb_max_samples), padded as the extractor pads."""
        n = self.nb_max_samples
        out = torch.zeros((waves.shape[0], n), dtype=torch.float32, device=waves.device)
        for i, length in enumerate(lengths.tolist()):
            wave = waves[i, :length].float()
            if length < n and self.padding == "repeat":
                wave = wave.repeat(n // length + 1)[:n]
            elif length < n and self.padding == "repeatpad":
                wave = wave.repeat(n // length)
            out[i, : wave.shape[0]] = wave[:n]
        return out

    def __call__(
        self, waves: torch.Tensor, lengths: torch.Tensor, filters: torch.Tensor, channels: int
    ) -> torch.Tensor:
        """``channels``: 4 for a model with ``enable_fusion`` (the extractor's fusion layout, the
        same spectrogram four times), 1 otherwise (a model without fusion takes one channel)."""
        if int(lengths.max()) > self.nb_max_samples:
            raise ValueError(f"CLAP windows must be at most {self.nb_max_samples} samples, got {int(lengths.max())}")
        padded = self.pad(waves, lengths)  # (w, n)
        window = torch.hann_window(self.fft_window_size, periodic=True, device=padded.device)
        spec = torch.stft(
            padded,
            self.fft_window_size,
            self.hop_length,
            window=window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # (w, freqs, frames)
        power = spec.real**2 + spec.imag**2
        mel = torch.einsum("wft,fm->wtm", power, filters)  # (w, frames, mels)
        log_mel = 10.0 * torch.log10(mel.clamp(min=1e-10))
        return log_mel[:, None].expand(-1, channels, -1, -1)  # (w, channels, frames, mels)


def front_end_options(family_kind: str, fe: Any) -> dict[str, Any]:
    """The picklable front-end parameters of one model type, for the encoder spec."""
    return asdict(_front_end_class(family_kind).from_extractor(fe))


def front_end_from_options(family_kind: str, params: Mapping[str, Any]) -> Any:
    return _front_end_class(family_kind)(**params)


def _front_end_class(family_kind: str) -> Any:
    return {"ast": FbankFrontEnd, "waveform": WaveformFrontEnd, "clap": ClapFrontEnd}[family_kind]


def resolve_window_options(opts: dict[str, Any], rate: int, model_window_s: float | None, min_seconds: float) -> None:
    """The ``preprocessing`` the model declares (its rate, its window length, the shortest clip it
    can take), with the user's keys over it; then the window and batch options checked."""
    declared = {
        "sample_rate": rate,
        "window_seconds": model_window_s or DEFAULT_WAVEFORM_WINDOW_S,
        "min_seconds": max(DEFAULT_MIN_SECONDS, min_seconds),
    }
    opts["preprocessing"] = {**declared, **(opts["preprocessing"] or {})}
    prep = resolve_audio_options(opts)
    if prep.sample_rate != rate:
        raise ValueError(f"preprocessing.sample_rate {prep.sample_rate} is not the model's rate {rate}")
    if model_window_s is not None and prep.window_seconds > model_window_s:
        raise ValueError(
            f"preprocessing.window_seconds {prep.window_seconds} is longer than the model takes ({model_window_s:g} s)"
        )
    if prep.min_seconds < min_seconds:
        raise ValueError(
            f"preprocessing.min_seconds {prep.min_seconds} is shorter than the model can take ({min_seconds:g} s)"
        )
    check_runtime_options(opts)
