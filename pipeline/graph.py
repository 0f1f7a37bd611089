"""The whole graph on one screen: sources -> per encoder (prepare -> encode) -> Parquet sink.

``embed`` adds vector and error columns to any Ray Dataset; ``run`` reads the configured
sources and writes the output folder, resuming where an earlier run of the same config stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from pipeline.adapter import apply_stage, named, resolve_task_stage
from pipeline.cluster import cluster_shape
from pipeline.columns import error_column
from pipeline.config import Config
from pipeline.plan import EncoderPlan, as_config, encoders_metadata, plan
from pipeline.schema import plan_output_schema
from pipeline.sink import ParquetSink, Sink, fingerprint, write_part
from pipeline.sources import SourcePlan, chunk_row, needs_reading, plan_chunks, prepass, read_chunk_rows
from pipeline.stages import EncodeActor, prepare_batch

log = logging.getLogger(__name__)


def add_encoders(dataset: Any, plans: list[EncoderPlan]) -> Any:
    for p in plans:
        dataset = apply_stage(
            dataset, prepare_batch, p.prepare, name=f"Prepare[{p.spec.output}]", fn_kwargs={"spec": p.spec}
        )
        dataset = apply_stage(
            dataset,
            EncodeActor,
            p.encode,
            name=f"Encode[{p.spec.output}]",
            fn_constructor_kwargs={"spec": p.spec, "threads": p.encode.threads, "max_tokens": p.encode.max_tokens},
        )
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


def run(
    config: Config | Mapping[str, Any] | str | Path,
    overwrite: bool = False,
    dry_run: bool = False,
    takeover: bool = False,
) -> dict[str, Any]:
    """Embed the configured sources into the output folder; return the final manifest. With
    ``dry_run``: planning, the duplicate pass and resume accounting only; nothing is written,
    and the return value is ``dry_run_report``'s. ``takeover``: take the writer lease of a run
    that is gone without waiting for it to go stale."""
    config = as_config(config)
    plans = plan(config, cluster_shape())
    meta = encoders_metadata(plans, config)
    chunks = plan_chunks(config.sources)
    sink: Sink = ParquetSink(config, meta, fingerprint(config, meta))
    committed = sink.check(overwrite, takeover=takeover or dry_run)  # a dry run writes nothing
    sources = prepass(chunks, committed, config.output.on_duplicate_id, _ray_map)
    schema = plan_output_schema(config, [p.spec for p in plans], sources.schema, meta)
    if dry_run:
        return dry_run_report(sources)
    sink.begin()  # the first write: every usage error above leaves the output untouched
    try:
        parts = write_parts(config, plans, sources, schema)
        for part in parts.iter_rows():
            sink.record(part)
        if log.isEnabledFor(logging.DEBUG):  # --verbose: where the time went, per operator
            log.debug("Ray Data stats:\n%s", parts.stats())
        return sink.close(sources.total_rows, config.output.max_error_rate, sources.total_rows - sources.skipped_rows)
    except BaseException:  # an error or Ctrl-C: the next run need not wait for the lease to go stale
        sink.release()
        raise


def write_parts(config: Config, plans: list[EncoderPlan], sources: SourcePlan, schema: Any) -> Any:
    """Read chunks -> per encoder (prepare -> encode) -> write parts: a Dataset of one row per
    part written, for the driver to commit."""
    import ray

    items = [chunk_row(c, sources.drops.get(c.index, [])) for c in sources.chunks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(
        named(read_chunk_rows, "Read"), batch_size=1, batch_format="pyarrow", fn_kwargs={"schema": sources.schema}
    )
    # A chunk (256 files, or a Parquet row-group range) becomes blocks of an encoder batch, cut
    # inside the read task. Without it Ray Data fuses read with the first prepare and bundles
    # `batch_size` *chunks* into one task: no overlap with the encoder, and no read parallelism.
    dataset = dataset.repartition(target_num_rows_per_block=min(p.encode.batch_size for p in plans))
    dataset = add_encoders(dataset, plans)
    error_columns = [error_column(p.spec, m) for p in plans for m in p.spec.columns]
    write = resolve_task_stage(config.stage("write"), config.output.rows_per_file)
    return apply_stage(
        dataset,
        write_part,
        write,
        name="Write",
        fn_kwargs={"output": config.output.path, "schema": schema, "error_columns": error_columns},
    )


def dry_run_report(sources: SourcePlan) -> dict[str, Any]:
    """What ``--dry-run`` prints: input rows (before dedupe), duplicates, rows an earlier run
    committed, rows this run would embed, read chunks, and the driver's peak RSS so far."""
    import resource

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return {
        "rows": sources.total_rows + sources.duplicates,
        "duplicates": sources.duplicates,
        "committed": sources.skipped_rows,
        "to_embed": sources.total_rows - sources.skipped_rows,
        "chunks": len(sources.chunks),
        "driver_peak_rss_mb": round(peak_kb / 1024, 1),
    }


def _ray_map(fn: Any, chunks: list[Any]) -> list[Any]:
    """Chunks whose files must be opened run as Ray tasks; folder listings run right here,
    which saves starting worker processes before the real work."""
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    refs = {i: remote.remote(c) for i, c in enumerate(chunks) if needs_reading(c)}
    local = {i: fn(c) for i, c in enumerate(chunks) if i not in refs}
    fetched = dict(zip(refs, ray.get(list(refs.values()))))
    return [fetched[i] if i in fetched else local[i] for i in range(len(chunks))]
