"""The whole graph on one screen: sources -> per encoder (prepare -> encode) -> Parquet sink.

``embed`` adds vector and error columns to any Ray Dataset; ``run`` reads the configured
sources and writes the output folder, resuming where an earlier run of the same config stopped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa

from encoders import FAMILIES
from encoders.spec import EncoderSpec
from pipeline.adapter import ClusterShape, ResolvedStage, apply_stage, resolve_encode_stage, resolve_task_stage, wants_gpu
from pipeline.columns import embedding_column, error_column, extra_columns, vector_type
from pipeline.config import Config, ConfigError, config_from_dict, load_config
from pipeline.plan import plan_encoders
from pipeline.sink import FORMAT_VERSION, ParquetSink, fingerprint, output_schema, write_part
from pipeline.sources import FOLDER_KINDS, SourcePlan, chunk_row, needs_reading, plan_chunks, prepass, read_chunk_rows
from pipeline.stages import EncodeActor, prepare_batch

log = logging.getLogger(__name__)
# Text blocks are sorted by length inside the encoder: bigger blocks pad less.
DEFAULT_BATCH_ROWS = {"text": 1024, "image": 64, "audio": 32}


@dataclass(frozen=True)
class EncoderPlan:
    spec: EncoderSpec
    prepare: ResolvedStage
    encode: ResolvedStage


def as_config(config: Config | Mapping[str, Any] | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config)
    return load_config(config)


def cluster_shape(resources: Mapping[str, float] | None = None, autoscaler: Any = None) -> ClusterShape:
    """What the cluster has now, and whether the autoscaler can add GPU nodes. A GPU group
    that starts at zero shows no GPUs in ``cluster_resources()`` until something asks for one,
    so ``gpus: auto`` also looks at the autoscaler's node types (the cluster config it
    publishes to the GCS; absent on a local Ray)."""
    import ray

    resources = ray.cluster_resources() if resources is None else resources
    return ClusterShape(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                        gpu_autoscale=can_autoscale_gpus(autoscaler))


# Where `ray up` puts the autoscaling config on the head, where a submitted job's driver runs.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


def can_autoscale_gpus(autoscaler: Any = None, launcher_config: str | Path = LAUNCHER_CONFIG) -> bool:
    """True when some autoscaled node type offers GPUs and may have nodes. Two sources: the
    cluster config the autoscaler publishes to the GCS (KubeRay and autoscaler v2; what Ray
    Data's own autoscaler reads through ``ray._private.state.state``), then the cluster
    launcher's config on the head (``ray up``). Tests pass fakes for both."""
    if autoscaler is None:
        try:
            from ray._private.state import state as autoscaler
        except ImportError:  # a private module; the launcher's file below still tells
            autoscaler = None
    limits = autoscaler.get_max_resources_from_cluster_config() if autoscaler is not None else None
    if limits and float(limits.get("GPU", 0) or 0) > 0:
        return True
    return launcher_has_gpu_nodes(Path(launcher_config).expanduser())


def launcher_has_gpu_nodes(path: Path) -> bool:
    import yaml

    if not path.is_file():
        return False
    node_types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    return any(float((t.get("resources") or {}).get("GPU", 0) or 0) > 0 and t.get("max_workers", 1) != 0
               for t in node_types.values())


def plan(config: Config, shape: ClusterShape) -> list[EncoderPlan]:
    plans = []
    cpu_encoders = sum(not wants_gpu(config.stage("encode", e), shape) for e in config.encoders)
    for i, (encoder, spec) in enumerate(zip(config.encoders, plan_encoders(config.encoders))):
        default_batch = min(DEFAULT_BATCH_ROWS[m] for m in spec.columns)
        encode = resolve_encode_stage(config.stage("encode", encoder), shape, default_batch,
                                      f"encoders[{i}].resources", cpu_encoders,
                                      getattr(FAMILIES.get(spec.family), "cpu_actor_threads", None))
        prepare = resolve_task_stage(config.stage("prepare"), encode.batch_size)
        plans.append(EncoderPlan(spec, prepare, encode))
    return plans


def add_encoders(dataset: Any, plans: list[EncoderPlan]) -> Any:
    for p in plans:
        dataset = apply_stage(dataset, prepare_batch, p.prepare, fn_kwargs={"spec": p.spec})
        dataset = apply_stage(dataset, EncodeActor, p.encode, fn_constructor_kwargs={
            "spec": p.spec, "threads": p.encode.threads, "max_tokens": p.encode.max_tokens})
    return dataset


def embed(dataset: Any, config: Config | Mapping[str, Any] | str | Path) -> Any:
    """Add ``<output>_embedding`` and ``<output>_error`` columns to a Ray Dataset.

    Only the config's encoders and resources are used: a mapping may leave out sources and
    output. Ray must already be initialized.
    """
    if isinstance(config, Mapping):
        config = {"sources": [{"path": "<dataset>"}], "output": {"path": "<dataset>"}, **config}
    config = as_config(config)
    return add_encoders(dataset, plan(config, cluster_shape()))


def encoders_metadata(plans: list[EncoderPlan], config: Config) -> dict[str, Any]:
    from encoders.device import planned_precision

    return {p.spec.output: {**p.spec.metadata(p.encode.device, planned_precision(p.encode.device, p.spec.options.get("precision", "auto"))),
                            "dtype": config.output.dtype}
            for p in plans}


def run(config: Config | Mapping[str, Any] | str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Embed the configured sources into the output folder; return the final manifest."""
    import ray

    config = as_config(config)
    plans = plan(config, cluster_shape())
    meta = encoders_metadata(plans, config)
    chunks = plan_chunks(config.sources)
    sink = ParquetSink(config, meta, fingerprint(config, meta))
    committed = sink.check(overwrite)
    sources = prepass(chunks, committed, config.output.on_duplicate_id, _ray_map)
    schema = _output_schema(config, plans, sources, meta)
    sink.begin()  # the first write: every usage error above leaves the output untouched

    items = [chunk_row(c, sources.drops.get(c.index, [])) for c in chunks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(read_chunk_rows, batch_size=1, batch_format="pyarrow",
                                  fn_kwargs={"schema": sources.schema})
    # A chunk (256 files, or a Parquet row-group range) becomes blocks of an encoder batch, cut
    # inside the read task. Without it Ray Data fuses read with the first prepare and bundles
    # `batch_size` *chunks* into one task: no overlap with the encoder, and no read parallelism.
    dataset = dataset.repartition(target_num_rows_per_block=min(p.encode.batch_size for p in plans))
    dataset = add_encoders(dataset, plans)
    error_columns = [error_column(p.spec, m) for p in plans for m in p.spec.columns]
    write = resolve_task_stage(config.stage("write"), config.output.rows_per_file)
    parts = apply_stage(dataset, write_part, write, fn_kwargs={
        "output": config.output.path, "schema": schema, "error_columns": error_columns})
    for part in parts.iter_rows():
        sink.record(part)
    if log.isEnabledFor(logging.DEBUG):  # --verbose: where the time went, per operator
        log.debug("Ray Data stats:\n%s", parts.stats())
    return sink.close(sources.total_rows, config.output.max_error_rate)


def _ray_map(fn: Any, chunks: list[Any]) -> list[Any]:
    """Chunks whose files must be opened run as Ray tasks; folder listings run right here,
    which saves starting worker processes before the real work."""
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    refs = {i: remote.remote(c) for i, c in enumerate(chunks) if needs_reading(c)}
    local = {i: fn(c) for i, c in enumerate(chunks) if i not in refs}
    fetched = dict(zip(refs, ray.get(list(refs.values()))))
    return [fetched[i] if i in fetched else local[i] for i in range(len(chunks))]


def _output_schema(config: Config, plans: list[EncoderPlan], sources: SourcePlan, meta: Mapping[str, Any]) -> pa.Schema:
    read_names = sources.schema.names
    for i, p in enumerate(plans):
        for column in p.spec.columns.values():
            if column not in read_names:
                raise ConfigError(f"encoders[{i}].column: {column!r} is not a source column; columns: {', '.join(read_names)}")
    keep = [n for n in read_names if n != "id"]
    for source in config.sources:
        if source.passthrough is not None:
            missing = [c for c in source.passthrough if c not in read_names]
            if missing:
                raise ConfigError(f"sources: passthrough column {missing[0]!r} is not a source column")
    wanted = {c for s in config.sources if s.passthrough is not None for c in s.passthrough}
    if any(s.passthrough is not None for s in config.sources):
        keep = [n for n in keep if n in wanted]
    # A folder source's file contents stay in the files; its id is the file's path.
    contents = {FOLDER_KINDS[s.kind][1] for s in config.sources if s.kind in FOLDER_KINDS}
    keep = [n for n in keep if n not in contents or n in wanted]
    vectors = []
    for p in plans:
        vtype = vector_type(p.spec.dim, config.output.vector_type, config.output.dtype)
        for modality in p.spec.columns:
            vectors.append((embedding_column(p.spec, modality), vtype, error_column(p.spec, modality)))
    schema = output_schema(sources.schema, keep, vectors, {"version": FORMAT_VERSION, "encoders": dict(meta)})
    for p in plans:  # patch grids and audio window counts come last
        for modality in p.spec.columns:
            for _, column, arrow_type in extra_columns(p.spec, modality, config.output.dtype):
                schema = schema.append(pa.field(column, arrow_type))
    return schema
