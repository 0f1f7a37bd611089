"""Config encoders -> picklable encoder specs, with D known before anything is written."""

from __future__ import annotations

from encoders import FAMILIES
from encoders.core.registry import MissingDependencyError, UnknownNameError, detect_family
from encoders.core.spec import EncoderSpec, SpecRequest
from encoders.core.weights import WeightsNotFoundError, lookup_alias, resolve_weights
from pipeline.config import ConfigError, EncoderConfig


def plan_encoder(encoder: EncoderConfig, where: str) -> EncoderSpec:
    try:
        weights = resolve_weights(encoder.model)
    except WeightsNotFoundError as exc:
        raise ConfigError(f"{where}.model: {exc}") from None
    alias = lookup_alias(encoder.model)
    try:
        family = FAMILIES.get(encoder.family or detect_family(weights.path, alias))
    except (UnknownNameError, MissingDependencyError) as exc:
        raise ConfigError(f"{where}.family: {exc}") from None
    columns = dict(encoder.columns)
    if "*" in columns:
        if len(family.modalities) != 1:
            raise ConfigError(
                f"{where}: family {family.name!r} takes {', '.join(family.modalities)}; use columns: "
                f"{{modality: column}}"
            )
        columns = {family.modalities[0]: columns["*"]}
    wrong = sorted(set(columns) - set(family.modalities))
    if wrong:
        raise ConfigError(
            f"{where}.columns: family {family.name!r} takes {', '.join(family.modalities)}, not {wrong[0]!r}"
        )
    options = {**(alias.defaults if alias else {}), **encoder.options}
    try:
        return family.build_spec(SpecRequest(encoder.output, columns, weights, options, alias.dim if alias else None))
    except (ValueError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: {message}") from None


def plan_encoders(encoders: tuple[EncoderConfig, ...]) -> list[EncoderSpec]:
    return [plan_encoder(e, f"encoders[{i}]") for i, e in enumerate(encoders)]
