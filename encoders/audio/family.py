"""The prepare half and the extra column that every audio family shares, and the spec of a
family whose model declares its front end as data."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import pyarrow as pa

from encoders.audio.prepare import AudioPreprocess, prepare_audio, resolve_audio_options
from encoders.core.spec import EncoderFamily, EncoderSpec, ExtraColumn, Prepared, SpecRequest, validate_options

# ``<output>_windows``: how many windows were pooled into each clip's vector (null without one).
WINDOWS = ExtraColumn("windows", pa.int32())


class AudioFamily(EncoderFamily):
    """The prepare half and the extra column that every audio family shares."""

    modalities: tuple[str, ...] = ("audio",)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        return prepare_audio(values, AudioPreprocess.from_options(spec.options))

    def extra_columns(self, spec: EncoderSpec, modality: str) -> tuple[ExtraColumn, ...]:
        return (WINDOWS,) if modality == "audio" else ()

    def prepared_bytes(self, spec: EncoderSpec, modality: str) -> int:
        # float32 samples of max_windows windows: 48 kHz x 16 x 10 s is 31 MB a row
        return 4 * AudioPreprocess.from_options(spec.options).max_samples if modality == "audio" else 0


class DeclaredAudioFamily(AudioFamily):
    """An audio family whose model declares its front end as data (the registry alias's
    ``preprocessing``, ``hop_seconds`` and ``features``): audio-speaker, audio-sfx. Subclasses
    set ``option_table`` (``AUDIO_OPTIONS`` and their own) and ``features``."""

    option_table: Mapping[str, tuple[Any, Any]]
    features: Callable[[Mapping[str, Any]], dict[str, Any]]  # options -> the checked front end

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        from encoders.core.device import check_runtime_options
        from encoders.core.probe import spec_with_dim

        opts = validate_options(request.options, self.option_table, self.name)
        resolve_audio_options(opts)
        opts["features"] = self.features(opts)
        check_runtime_options(opts)
        return spec_with_dim(self, request, opts)
