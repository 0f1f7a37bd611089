"""``precision: auto``, resolved once per run before anything is written.

The driver is often a CPU head unlike its workers, so it does not decide from its own hardware.
For each encoder whose precision is ``auto`` it runs one probe task with the encoder's own
resources (its GPU, its custom resources), so the task lands on a node of the kind the encoder's
actors use. The task sees what that node computes natively (encoders/core/device.py) and, where
that is a reduced precision, embeds a few real input rows in fp32 and in it; the reduced one is
kept only when every vector keeps cosine >= 0.999 (encoders/core/fidelity.py, cached per model
and device on the node). The answer is pinned into the encoder's options: the metadata and the
resume fingerprint record it, so a run started in fp32 and resumed in bf16 refuses instead of
mixing. Every actor checks that its node runs the pinned precision natively and fails loudly
when it does not: one run never mixes precisions.

On an embedded Ray (``init_ray`` started it; one node, this machine) the driver sees the
hardware the actors get and shares their cache, so a CPU encoder's cached answer is read in the
driver: no probe task, whose worker start and torch import cost about 3 s of a local run.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from encoders.core.spec import EncoderSpec
from pipeline.plan import EncoderPlan
from pipeline.ray_env import embedded

log = logging.getLogger(__name__)

PROBE_ROWS = 64
PROBE_SOURCES = 8  # the first chunk of each of the first sources: a joined column is in a later one


def resolve_precisions(
    plans: Sequence[EncoderPlan],
    chunks: pa.Table | None,
    retried_io_errors: list[str] | None = None,
    dataset: Any = None,
) -> list[EncoderPlan]:
    """Plans whose ``auto`` precision is pinned to what each probe chose (logged with why). The
    probe rows are read from the first chunk of each source, or taken from ``dataset``
    (``embed()`` on a Ray Dataset)."""
    todo = [i for i, p in enumerate(plans) if p.spec.options.get("precision", "auto") == "auto"]
    if not todo:
        return list(plans)
    import ray

    probe_input: tuple[pa.Table | None, pa.Table | None] | None = None  # (first chunks, rows), once needed
    reports: dict[int, Any] = {}
    here = embedded()  # one node, this machine: a cached answer needs no task (~3 s of worker start)
    for i in todo:
        stage = plans[i].encode
        if here and not stage.num_gpus and not stage.resources:
            reports[i] = cached_choice(plans[i].spec)
            if reports[i] is not None:
                continue
        remote = ray.remote(probe_task).options(
            num_cpus=1, num_gpus=stage.num_gpus, resources=dict(stage.resources or {}), max_retries=3
        )
        probe_input = probe_input or _probe_input(chunks, dataset)
        first, rows = probe_input
        reports[i] = remote.remote(plans[i].spec, stage.threads, stage.max_tokens, first, retried_io_errors, rows)
    out = list(plans)
    for i, report in reports.items():
        report = report if isinstance(report, dict) else ray.get(report)
        spec = plans[i].spec
        log.info("encoder %s: precision auto -> %s (%s)", spec.output, report["precision"], _why(report))
        out[i] = replace(out[i], spec=pinned(spec, report["precision"]), pinned=True)
    return out


def pinned(spec: EncoderSpec, precision: str) -> EncoderSpec:
    return replace(spec, options={**spec.options, "precision": precision})


def _why(report: dict[str, Any]) -> str:
    if report["candidate"] is None:
        return f"{report['device']} has no native reduced precision"
    verdict = "kept" if report["precision"] != "fp32" else "refused"
    return f"{report['candidate']} {verdict}: min cosine {report['min_cosine']} to fp32 on {report['rows']} rows"


def _probe_input(chunks: pa.Table | None, dataset: Any) -> tuple[pa.Table | None, pa.Table | None]:
    if dataset is not None:
        return None, dataset.take_batch(PROBE_ROWS, batch_format="pyarrow")
    return _first_chunk_of_each_source(chunks), None


def _first_chunk_of_each_source(chunks: pa.Table) -> pa.Table:
    if not chunks.num_rows:
        return chunks
    sources = chunks.column("source").to_numpy()
    starts = np.flatnonzero(np.r_[True, sources[1:] != sources[:-1]])[:PROBE_SOURCES]
    return chunks.take(pa.array(starts))


def probe_task(
    spec: EncoderSpec,
    threads: int,
    max_tokens: int,
    chunks: pa.Table | None,
    retried_io_errors: list[str] | None,
    rows: pa.Table | None = None,
) -> dict[str, Any]:
    """A task on a node of the encoder's kind: this node's choice for ``auto`` (cached). The
    probe rows: ``rows``, or those of ``chunks`` (read here)."""
    from encoders.core.device import pick_device
    from encoders.core.fidelity import choose_precision

    device = pick_device()

    def measure(candidate: str) -> tuple[float, int]:
        from encoders.core.fidelity import MIN_ROWS, min_cosine
        from pipeline.stages import EncodeActor, prepare_batch

        sample = probe_rows(spec, chunks, rows)
        if sample.num_rows < MIN_ROWS:  # too few to decide: fp32, without loading the model
            return 1.0, sample.num_rows
        reference_spec = pinned(spec, "fp32")
        actor = EncodeActor(reference_spec, threads, max_tokens)  # sets torch's threads
        batch = prepare_batch(sample, reference_spec, retried_io_errors)
        reference = _vectors(actor(batch), spec)
        actor.model.precision = candidate
        reduced = _vectors(actor(batch), spec)
        both = [(a, b) for a, b in zip(reference, reduced) if a is not None and b is not None]
        if not both:
            return 1.0, 0
        return min_cosine(np.array([a for a, _ in both]), np.array([b for _, b in both])), len(both)

    return choose_precision(device, _probe_key(spec), measure)


class _NotCached(Exception):
    pass


def cached_choice(spec: EncoderSpec) -> dict[str, Any] | None:
    """The CPU answer for ``auto`` that this machine has cached (or needs no probe for), read
    in the driver; None when only a probe can tell."""
    import torch

    from encoders.core.fidelity import choose_precision

    def measure(candidate: str) -> tuple[float, int]:
        raise _NotCached

    try:
        return choose_precision(torch.device("cpu"), _probe_key(spec), measure)
    except _NotCached:
        return None


def _probe_key(spec: EncoderSpec) -> dict[str, Any]:
    return {
        "family": spec.family,
        "sha": spec.weights_sha256,
        "model": spec.weights.reference,
        "options": {k: v for k, v in spec.options.items() if k != "precision"},
    }


def probe_rows(spec: EncoderSpec, chunks: pa.Table | None, rows: pa.Table | None = None) -> pa.Table:
    """Up to PROBE_ROWS real input rows with every column the encoder reads set."""
    from pipeline.sources import ReadChunk, read_chunk

    columns = list(spec.columns.values())
    found = []
    tables = [rows] if rows is not None else (read_chunk(ReadChunk.from_row(r)) for r in chunks.to_pylist())
    for table in tables:
        if not set(columns) <= set(table.column_names):
            continue
        mask = None
        for column in columns:
            valid = pc.is_valid(table.column(column))
            mask = valid if mask is None else pc.and_(mask, valid)
        found.append(table.filter(mask).slice(0, PROBE_ROWS))
        if sum(t.num_rows for t in found) >= PROBE_ROWS:
            break
    if not found:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(found, promote_options="permissive").slice(0, PROBE_ROWS)


def _vectors(table: pa.Table, spec: EncoderSpec) -> list[Any]:
    """Per row, the concatenation of its embedding columns (None where any is null)."""
    from pipeline.columns import embedding_column

    columns = [table.column(embedding_column(spec, m)).to_pylist() for m in spec.columns]
    return [None if any(v is None for v in values) else np.concatenate(values) for values in zip(*columns)]
