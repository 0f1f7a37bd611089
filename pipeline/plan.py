"""Planning, on the driver before anything runs: config encoders -> picklable encoder specs
(D known), then each encoder's prepare and encode stages resolved for the cluster, and the
metadata the output will carry."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from encoders import FAMILIES
from encoders.core.registry import MissingDependencyError, UnknownNameError, detect_family
from encoders.core.spec import EncoderSpec, SpecRequest
from encoders.core.weights import WeightsNotFoundError, lookup_alias, resolve_weights
from pipeline.adapter import ResolvedStage, resolve_encode_stage, resolve_task_stage, wants_gpu
from pipeline.cluster import ClusterShape
from pipeline.config import Config, ConfigError, EncoderConfig, config_from_dict, load_config


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
        spec = family.build_spec(SpecRequest(encoder.output, columns, weights, options, alias.dim if alias else None))
    except (ValueError, OSError, MissingDependencyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where}: {message}") from None
    return with_dimensions(spec, encoder.dimensions, where)


def with_dimensions(spec: EncoderSpec, wanted: int | None, where: str) -> EncoderSpec:
    """``dimensions: N`` (else the folder's declared ``truncate_dim``): the output holds the
    first N values of each vector, renormalized; the actor still loads the model's D."""
    n = wanted or spec.options.get("truncate_dim")
    if not n:
        return spec
    if not 0 < n <= spec.dim:
        raise ConfigError(f"{where}.dimensions: {n} is more than the model's {spec.dim} values")
    return replace(spec, dim=n, options={**spec.options, "dimensions": n, "model_dim": spec.dim})


def plan_encoders(encoders: tuple[EncoderConfig, ...]) -> list[EncoderSpec]:
    return [plan_encoder(e, f"encoders[{i}]") for i, e in enumerate(encoders)]


# Text blocks are sorted by length inside the encoder: bigger blocks pad less, and each block
# costs the driver's scheduler and the object store the same whatever its rows. On short texts
# (median 16 tokens) 2048-row blocks keep 97% of the padded tokens real against 95% at 1024,
# and ran a 60k-row job 6% faster on 2 cores (benchmarks/README.md); 4096 and 8192 were no
# faster there. The cost: a block of long texts is about 20 s of one CPU actor, so a short job
# waits longer for its first block and its last one.
DEFAULT_BATCH_ROWS = {"text": 2048, "image": 64, "audio": 32}
# Rows per output part: each part is one commit, so a killed run loses at most about a minute
# of work (MiniLM runs 70-900 rows/s on 2 CPU cores, fp32 long texts to bf16 short ones;
# thousands on a GPU). Long runs on GPUs still write parts of tens of MB.
PART_ROWS = {"cpu": 2048, "cuda": 32768}
# Where rows are large (decoded images, audio windows, raw bytes passed through), a default
# batch or part is cut to about this many bytes: Ray Data's block size, and a part that a
# reader opens comfortably. A stage's batch_rows and output.rows_per_file are taken as given.
BATCH_BYTES = 128 * 2**20
PART_BYTES = 512 * 2**20


def rows_for_bytes(rows: int, row_bytes: int, limit: int) -> int:
    """At most ``rows`` rows, and no more than ``limit`` bytes of them (one row at least)."""
    return rows if row_bytes <= 0 else max(1, min(rows, limit // row_bytes))


@dataclass(frozen=True)
class EncoderPlan:
    spec: EncoderSpec
    prepare: ResolvedStage
    encode: ResolvedStage
    pinned: bool = False  # precision resolved from auto by a probe (pipeline/precision.py)
    prepare_in_encoder: bool = False  # the actor prepares its own batches (``prepare_place``)


def as_config(config: Config | Mapping[str, Any] | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config)
    return load_config(config)


def plan(config: Config, shape: ClusterShape) -> list[EncoderPlan]:
    plans = []
    cpu_encoders = sum(not wants_gpu(config.stage("encode", e), shape) for e in config.encoders)
    for i, (encoder, spec) in enumerate(zip(config.encoders, plan_encoders(config.encoders))):
        family = FAMILIES.get(spec.family)
        prepared = sum(family.prepared_bytes(spec, m) for m in spec.columns)
        default_batch = rows_for_bytes(min(DEFAULT_BATCH_ROWS[m] for m in spec.columns), prepared, BATCH_BYTES)
        encode = resolve_encode_stage(
            config.stage("encode", encoder),
            shape,
            default_batch,
            f"encoders[{i}].resources",
            cpu_encoders,
            family.cpu_actor_threads,
        )
        prepare = resolve_task_stage(config.stage("prepare"), encode.batch_size)
        in_encoder = prepare_place(config.stage("prepare").where, encode) == "encoder"
        plans.append(EncoderPlan(spec, prepare, encode, prepare_in_encoder=in_encoder))
    return plans


def prepare_place(where: str, encode: ResolvedStage) -> str:
    """Where an encoder's inputs are prepared (decoded, resampled, tokenized): ``tasks`` or
    ``encoder``. ``auto`` prepares in the encoder actor when it runs on CPUs alone. There a
    prepare task takes the same cores as the actors, so it only adds the handover: the
    prepared values go through the object store (a clip's wave is 0.5 MB, an image's crop
    150 KB) and a third process shares two cores. A GPU actor keeps its prepare in CPU tasks,
    which decode the next batches while the GPU runs; so does an actor placed by custom
    resources, whose nodes may be anything."""
    if where != "auto":
        return where
    return "encoder" if encode.num_gpus == 0 and not encode.resources else "tasks"


def encoders_metadata(plans: list[EncoderPlan], config: Config) -> dict[str, Any]:
    from encoders.core.device import planned_precision

    return {
        p.spec.output: {
            **p.spec.metadata(
                p.encode.device, planned_precision(p.encode.device, p.spec.options.get("precision", "auto"))
            ),
            "dtype": config.output.dtype,
        }
        for p in plans
    }


def sized_for_input(plans: list[EncoderPlan], config: Config, row_bytes: int) -> list[EncoderPlan]:
    """Default batches cut further where input rows are large (``row_bytes`` as read: a Parquet
    column of image bytes travels with each row through every stage)."""
    out = []
    for encoder, p in zip(config.encoders, plans):
        if config.stage("encode", encoder).batch_rows is None and row_bytes > 0:
            family = FAMILIES.get(p.spec.family)
            prepared = sum(family.prepared_bytes(p.spec, m) for m in p.spec.columns)
            rows = rows_for_bytes(p.encode.batch_size, row_bytes + prepared, BATCH_BYTES)
            encode = replace(p.encode, batch_size=rows)
            prepare = p.prepare if config.stage("prepare").batch_rows else replace(p.prepare, batch_size=rows)
            p = replace(p, prepare=prepare, encode=encode)
        out.append(p)
    return out


def default_part_rows(plans: list[EncoderPlan], row_bytes: int = 0) -> int:
    """The slowest encoder sets the cadence; large rows cut a part to about PART_BYTES."""
    vector_bytes = sum(4 * (p.spec.dim or 0) * len(p.spec.columns) for p in plans)
    return rows_for_bytes(min(PART_ROWS[p.encode.device] for p in plans), row_bytes + vector_bytes, PART_BYTES)
