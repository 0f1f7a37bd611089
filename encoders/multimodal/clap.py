"""hf-clap: CLAP's text and audio towers into one space, one encoder for
``columns: {text: ..., audio: ...}``.

The text and audio projections (what ``get_text_features`` / ``get_audio_features`` return),
L2-normalized by default as CLAP compares them. Text is tokenized by the folder's tokenizer,
truncated to the model's positions (encoders/text/tokenize.py). Audio takes the folder's
feature-extractor settings: windows of at most the extractor's ``max_length_s`` (10 s), so its
random fusion crops never apply (encoders/audio/features.py), pooled per clip as hf-audio pools
them (encoders/audio/windows.py), with ``<output>_audio_windows``.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from encoders.audio.family import AudioFamily
from encoders.audio.features import (
    HF_WINDOW_OPTIONS,
    front_end_from_options,
    front_end_options,
    load_feature_extractor,
    resolve_window_options,
)
from encoders.audio.windows import WindowEncoder
from encoders.core.batching import pad_sequences
from encoders.core.device import autocast
from encoders.core.probe import meta_dim, spec_with_dim
from encoders.core.spec import EncodeResult, EncoderSpec, Prepared, SpecRequest, validate_options
from encoders.multimodal.towers import in_batches, shared_space, token_sequences
from encoders.text.tokenize import load_tokenizer, resolve_max_length, tokenize_truncated

CLAP_OPTIONS = {
    "normalize": (bool, True),
    "max_length": (int, None),
    "max_chars": (int, 1_000_000),
    **HF_WINDOW_OPTIONS,
}


class HFClapFamily(AudioFamily):
    name = "hf-clap"
    modalities = ("text", "audio")

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        from transformers import AutoConfig

        opts = validate_options(request.options, CLAP_OPTIONS, self.name)
        opts["front_end_kind"] = "clap"
        opts["front_end"] = front_end_options("clap", load_feature_extractor(request.weights.path))
        text = AutoConfig.from_pretrained(request.weights.path).text_config
        # RoBERTa positions start after the padding index.
        limits = [
            int(text.max_position_embeddings) - int(text.pad_token_id or 0) - 1,
            getattr(load_tokenizer(request.weights.path, False), "model_max_length", None),
        ]
        limit = min(v for v in limits if isinstance(v, int) and 0 < v < 1_000_000)
        resolve_max_length(opts, limit)
        front = opts["front_end"]
        resolve_window_options(opts, front["sampling_rate"], front["nb_max_samples"] / front["sampling_rate"], 0.0)
        return spec_with_dim(self, request, opts)  # projection_dim is not trusted

    def meta_dim(self, spec: EncoderSpec) -> int | None:
        return _meta_dim(spec)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        if modality == "audio":
            return super().prepare(spec, modality, values)
        return tokenize_truncated(spec.weights.path, values, spec.options["max_length"], spec.options["max_chars"])

    def load(self, spec: EncoderSpec, device: torch.device) -> "HFClapEncoder":
        return HFClapEncoder(spec, device)


class HFClapEncoder(WindowEncoder):
    """The model half of hf-clap: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        from transformers import ClapModel

        super().__init__(spec, device)
        self.front = front_end_from_options("clap", spec.options["front_end"])
        self.model = ClapModel.from_pretrained(spec.weights.path, dtype=torch.float32).eval().to(device)
        self.filters = self.front.mel_filters(device)
        self.channels = 4 if self.model.config.audio_config.enable_fusion else 1
        tokenizer = load_tokenizer(spec.weights.path, False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._check_dim(spec)

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> EncodeResult:
        if modality == "audio":
            return self.encode_audio(values)
        sequences, valid = token_sequences(values)
        step = self.options["micro_batch"] * 8  # text is far cheaper than 10 s of audio
        features = [self._text(b) for b in in_batches(sequences, step)]
        return shared_space(features, valid, self.dim, self.options["normalize"])

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
            pooled = self.model.text_model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).pooler_output
            return self.model.text_projection(pooled).float().cpu()


def _meta_dim(spec: EncoderSpec) -> int | None:
    """D from the projections run on the meta device: no weight is read."""
    from transformers import ClapConfig, ClapModel

    config = ClapConfig.from_pretrained(spec.weights.path)
    text_width = int(config.text_config.hidden_size)

    def run(model: ClapModel) -> torch.Tensor:
        text = model.text_projection(torch.zeros((1, text_width)))
        audio = model.audio_projection(torch.zeros((1, int(config.audio_config.hidden_size))))
        if text.shape[-1] != audio.shape[-1]:
            raise ValueError("the text and audio projections disagree")
        return text

    return meta_dim(lambda: ClapModel(config), run)
