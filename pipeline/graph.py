"""The whole graph on one screen: sources -> per encoder (prepare -> encode) -> Parquet sink.

``embed`` adds vector and error columns to any Ray Dataset; ``run`` reads the configured
sources and writes the output folder, resuming where an earlier run of the same config stopped.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow.compute as pc

from encoders.core.retry import configure as configure_retries
from pipeline.adapter import apply_stage, read_remote_args, resolve_task_stage
from pipeline.chunk_read import CPU_BLOCK_BYTES, chunk_dataset
from pipeline.chunks import FUSED_CHUNK_ROWS, plan_sources
from pipeline.cluster import cluster_shape, retried_io_errors
from pipeline.columns import error_column, extra_columns
from pipeline.config import Config
from pipeline.joins import id_pass
from pipeline.lance_sink import LanceSink
from pipeline.plan import EncoderPlan, as_config, default_part_rows, encoders_metadata, plan, sized_for_input
from pipeline.precision import resolve_precisions
from pipeline.preflight import sources_digest
from pipeline.progress import ReadPlan, account
from pipeline.schema import plan_output_schema
from pipeline.sink import ParquetSink, Sink, fingerprint, write_part
from pipeline.stages import EncodeActor, prepare_batch, prepare_chunk
from pipeline.tasks import RayTasks

log = logging.getLogger(__name__)


def add_encoders(dataset: Any, plans: list[EncoderPlan], chunks_fused: bool = False) -> Any:
    """``chunks_fused``: the dataset is a chunk read with the first prepare's resources, which
    takes each chunk whole (``prepare_chunk``) so that Ray Data fuses the two. An encoder that
    prepares its own batches (``EncoderPlan.prepare_in_encoder``) has no prepare stage."""
    transient = retried_io_errors()
    for i, p in enumerate(plans):
        kwargs = {"spec": p.spec, "retried_io_errors": transient}
        if not p.prepare_in_encoder:
            if chunks_fused and i == 0:
                stage = replace(p.prepare, batch_size=None)
                prepare, kwargs = prepare_chunk, {**kwargs, "rows": p.prepare.batch_size}
            else:
                stage, prepare = p.prepare, prepare_batch
            dataset = apply_stage(dataset, prepare, stage, name=f"Prepare[{p.spec.output}]", fn_kwargs=kwargs)
        dataset = apply_stage(
            dataset,
            EncodeActor,
            p.encode,
            name=f"Encode[{p.spec.output}]",
            fn_constructor_kwargs={
                "spec": p.spec,
                "threads": p.encode.threads,
                "max_tokens": p.encode.max_tokens,
                "node_threads": p.encode.node_threads,
                "require_native": p.pinned,
                "prepare_io": transient if p.prepare_in_encoder else None,
            },
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
    plans = plan(config, cluster_shape())
    plans = resolve_precisions(plans, None, retried_io_errors(), dataset=dataset)  # auto: as run() resolves it
    dataset = add_encoders(dataset, plans)
    extras = [c for p in plans for m in p.spec.columns for _, c, _ in extra_columns(p.spec, m, config.output.dtype)]
    if extras and len(plans) > 1:  # as the output schema: every encoder's vector and error, then the extras
        dataset = dataset.map_batches(
            extras_last, fn_kwargs={"extras": extras}, batch_format="pyarrow", zero_copy_batch=True
        )
    return dataset


def extras_last(table: Any, extras: list[str]) -> Any:
    """The extra columns (patch grids, audio window counts) moved after all the others, in the
    encoders' order: the column order the output files have."""
    return table.select(
        [n for n in table.column_names if n not in extras] + [n for n in extras if n in table.column_names]
    )


def run(
    config: Config | Mapping[str, Any] | str | Path,
    overwrite: bool = False,
    dry_run: bool = False,
    takeover: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Embed the configured sources into the output folder; return the final manifest. With
    ``dry_run``: planning, the duplicate pass and resume accounting only; nothing is written,
    and the return value is ``dry_run_report``'s. ``takeover``: take the writer lease of a run
    that is gone without waiting for it to go stale. ``progress``: called with the rows to
    embed, it returns what counts committed rows (``add(rows)``, ``close()``; the CLI's
    ``pipeline.report.RowProgress``)."""
    config = as_config(config)
    plans = plan(config, cluster_shape())
    transient = retried_io_errors()
    configure_retries(transient)  # the driver's own manifest, log and lease I/O
    tasks = RayTasks(transient)
    digest = sources_digest(config.sources)  # before planning: a file changed later misses the next shortcut
    # Without a pass over every id (trust, no join), a WebDataset shard is counted by its read.
    count_on_read = config.output.on_duplicate_id == "trust" and not any(s.join for s in config.sources)
    chunks = plan_sources(config.sources, tasks, count_on_read)  # listings and footers, read in tasks
    plans = resolve_precisions(plans, chunks.chunks, transient)  # auto -> one precision for the run
    meta = encoders_metadata(plans, config)
    sink: Sink = (LanceSink if config.output.format == "lance" else ParquetSink)(
        config, meta, fingerprint(config, meta)
    )
    committed = sink.check(overwrite, takeover=takeover or dry_run)  # a dry run writes nothing
    duplicates = id_pass(chunks.chunks, config.sources, config.output.on_duplicate_id, tasks)
    sources = account(chunks, duplicates, committed, config.output.path, tasks)
    schema = plan_output_schema(config, [p.spec for p in plans], sources.schema, meta)
    if dry_run:
        return sources.report()
    plans = sized_for_input(plans, config, sources.row_bytes)
    # The first write: every usage error above leaves the output untouched.
    sink.begin(sources.expect, schema, {k: done for k, (done, _) in sources.uncounted.items()})
    try:
        if sources.chunks.num_rows:
            parts = write_parts(config, plans, sources, schema)
            counter = progress(sources.to_embed) if progress is not None else None
            for part in parts.iter_rows():
                sink.record(part)
                if counter is not None:
                    counter.add(int(part["rows"]))
            if counter is not None:
                counter.close()
            if log.isEnabledFor(logging.DEBUG):  # --verbose: where the time went, per operator
                log.debug("Ray Data stats:\n%s", parts.stats())
        sources = sources.settled(sink.totals)  # shards counted by their read: their counts
        sink.manifest["sources_digest"] = digest  # a re-run of unchanged local inputs stops before Ray
        return sink.close(sources.unique_rows, config.output.max_error_rate, sources.to_embed, chunks.warnings)
    except BaseException:  # an error or Ctrl-C: the next run need not wait for the lease to go stale
        sink.release()
        raise


def write_parts(config: Config, plans: list[EncoderPlan], sources: ReadPlan, schema: Any) -> Any:
    """Read chunks -> per encoder (prepare -> encode) -> write parts: a Dataset of one row per
    part written, for the driver to commit."""
    transient = retried_io_errors()
    read_kwargs = {"schema": sources.schema, "output": config.output.path}
    read_kwargs["retried_io_errors"] = transient
    read_kwargs["partners"] = sources.partners
    small = (pc.max(sources.chunks.column("rows")).as_py() or 0) <= FUSED_CHUNK_ROWS
    # A read fuses with a prepare task, never with an actor: an encoder that prepares its own
    # batches gets the read's blocks cut to its batch size, so both actors start at once and
    # finish together.
    remote, fused = read_remote_args(config.stage("read"), plans[0].prepare, small and not plans[0].prepare_in_encoder)
    block_rows = None if fused else min(p.encode.batch_size for p in plans)
    on_cpus = not any(p.encode.num_gpus for p in plans)
    dataset = chunk_dataset(sources.chunks, read_kwargs, remote, block_rows, CPU_BLOCK_BYTES if on_cpus else None)
    dataset = add_encoders(dataset, plans, chunks_fused=fused)
    error_columns = [error_column(p.spec, m) for p in plans for m in p.spec.columns]
    write = resolve_task_stage(
        config.stage("write"), config.output.rows_per_file or default_part_rows(plans, sources.row_bytes)
    )
    return apply_stage(
        dataset,
        write_part,
        write,
        name="Write",
        fn_kwargs={
            "output": config.output.path,
            "schema": schema,
            "error_columns": error_columns,
            "retried_io_errors": transient,
            "output_format": config.output.format,
        },
    )
