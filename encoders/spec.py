"""The picklable description of one encoder output, and the family interface."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import pyarrow as pa

from encoders.weights import ResolvedWeights


@dataclass(frozen=True)
class EncoderSpec:
    """Everything an actor needs to load and run one encoder; no model inside.

    ``columns`` maps a modality to its input column; ``options`` are the family's validated
    options (pooling, normalize, max_length, ...).
    """

    output: str
    family: str
    columns: Mapping[str, str]
    weights: ResolvedWeights
    dim: int
    weights_sha256: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def metadata(self, device: str, precision: str) -> dict[str, Any]:
        """The per-encoder entry of the ``omniembed`` Parquet metadata (no local paths)."""
        return {
            "model": self.weights.reference,
            "family": self.family,
            "revision": self.weights.revision,
            "weights_sha256": self.weights_sha256,
            "dim": self.dim,
            "dtype": self.options.get("dtype", "float32"),
            "pooling": self.options.get("pooling"),
            "normalize": self.options.get("normalize"),
            "max_length": self.options.get("max_length"),
            "device": device,
            "precision": precision,
            "columns": dict(self.columns),
            "options": {k: v for k, v in self.options.items()
                        if k not in ("pooling", "normalize", "max_length", "precision")},
        }


@dataclass
class Prepared:
    """What a CPU prepare step hands to the encoder: one compact Arrow value per row (null for
    absent or bad rows) and one error value per row (null when fine or absent)."""

    values: pa.Array
    errors: list[str | None]


class Encoder(Protocol):
    dim: int
    device: str
    precision: str

    def __call__(self, modality: str, values: pa.Array, max_tokens: int) -> tuple[Any, ...]:
        """Prepared values -> ((n, dim) float32 vectors, (n,) bool valid mask), optionally with a
        third item, a dict of extra per-row outputs: ``"patches"`` ((n, N*D) float32, pooling
        ``patches``) or ``"windows"`` ((n,) int, audio: windows pooled per clip). The pipeline
        writes them to ``<output>_patches`` / ``<output>_windows`` (pipeline/columns.py)."""


class EncoderFamily(Protocol):
    name: str
    modalities: tuple[str, ...]
    # Optional: torch threads per CPU actor that measure best for this family; absent means
    # one actor per encoder using all idle cores (pipeline/adapter.py).
    # cpu_actor_threads: int

    def build_spec(self, output: str, columns: Mapping[str, str], weights: ResolvedWeights,
                   options: Mapping[str, Any], dim: int | None) -> EncoderSpec: ...

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared: ...

    def load(self, spec: EncoderSpec, device: Any) -> Encoder: ...


def validate_options(options: Mapping[str, Any], table: Mapping[str, tuple[Any, Any]], family: str) -> dict[str, Any]:
    """A family's options checked against its table of name -> (type, default): unknown names
    and wrong types raise ValueError naming the option; null means the default."""
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for {family}; valid options: {', '.join(table)}")
    resolved: dict[str, Any] = {}
    for name, (kind, default) in table.items():
        value = options.get(name)
        value = default if value is None else value
        if isinstance(value, Mapping):
            value = dict(value)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ValueError(f"option {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
        resolved[name] = value
    return resolved
