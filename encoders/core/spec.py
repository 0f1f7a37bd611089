"""The picklable description of one encoder output, and the family interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np
import pyarrow as pa

from encoders.core.weights import ResolvedWeights

Columns = Mapping[str, str]  # modality -> input column
Options = Mapping[str, Any]  # a family's options, by name


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
            "options": {
                k: v for k, v in self.options.items() if k not in ("pooling", "normalize", "max_length", "precision")
            },
        }


@dataclass(frozen=True)
class SpecRequest:
    """What the planner knows when it asks a family for a spec: the output's name, its input
    columns by modality, the resolved weights, the options (a registry alias's defaults under
    the user's), and D where the registry declares it."""

    output: str
    columns: Columns
    weights: ResolvedWeights
    options: Options
    dim: int | None = None

    def spec(self, family: str, weights_sha256: str, options: Options, dim: int) -> EncoderSpec:
        return EncoderSpec(self.output, family, dict(self.columns), self.weights, dim, weights_sha256, options)


@dataclass
class Prepared:
    """What a CPU prepare step hands to the encoder: one compact Arrow value per row (null for
    absent or bad rows) and one error value per row (null when fine or absent)."""

    values: pa.Array
    errors: list[str | None]


@dataclass(frozen=True)
class ExtraColumn:
    """A per-row output a family adds beside ``_embedding``/``_error``, named
    ``<output>[_<modality>]_<name>``: ``arrow_type`` is ``list<float32>`` for (n, k) float rows
    (the output's ``dtype`` applies, as to vectors) or an integer type for (n,) counts."""

    name: str
    arrow_type: pa.DataType


@dataclass
class EncodeResult:
    """What an encoder returns for one batch of prepared values, in input order."""

    vectors: np.ndarray  # (n, dim) float32; rows where ``valid`` is False are ignored
    valid: np.ndarray  # (n,) bool: the row has a vector
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)  # ExtraColumn.name -> (n, k) or (n,)


class Encoder(Protocol):
    """The model half of a family: loaded once in the encoder actor, on its device."""

    dim: int
    device: Any
    precision: str

    def __call__(self, modality: str, values: pa.Array, max_tokens: int) -> EncodeResult:
        """Prepared values (``Prepared.values``) -> vectors, a valid mask and the family's extras."""
        ...


class EncoderFamily:
    """One way of turning a model folder into vectors. A family names its modalities, builds a
    picklable spec on the driver (options checked, D known), prepares values in CPU tasks and
    loads its ``Encoder`` in the actor. Subclasses set ``name`` and ``modalities``."""

    name: str
    modalities: tuple[str, ...]
    # Torch threads per CPU actor that measure best for this family, in as many actors as the
    # cores allow; None: one actor per encoder using all idle cores (pipeline/adapter.py).
    cpu_actor_threads: int | None = None

    def build_spec(self, request: SpecRequest) -> EncoderSpec:
        """Options checked and resolved against the model (a one-line ``ValueError`` naming the
        option otherwise), D known."""
        raise NotImplementedError

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        raise NotImplementedError

    def load(self, spec: EncoderSpec, device: Any) -> Encoder:
        raise NotImplementedError

    def extra_columns(self, spec: EncoderSpec, modality: str) -> tuple[ExtraColumn, ...]:
        """The per-row outputs this spec adds for ``modality`` (patch grids, window counts)."""
        return ()

    def meta_dim(self, spec: EncoderSpec) -> int | None:
        """D without reading the weights (the model on the meta device, or a config value that
        is exact), or None: the planner then probes the loaded model once on the CPU."""
        return None

    def prepared_bytes(self, spec: EncoderSpec, modality: str) -> int:
        """The most bytes one row's prepared value takes (0: small), so that stage batches can
        be sized by bytes where rows are large (a decoded image, 16 windows of audio)."""
        return 0


def check_dim(spec: EncoderSpec, dim: int) -> int:
    """The loaded model's D against the plan's (the output schema was written with it)."""
    if spec.dim and spec.dim != dim:
        raise RuntimeError(f"encoder {spec.output!r}: model gives {dim}-d vectors, but the plan expected {spec.dim}")
    return dim


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
