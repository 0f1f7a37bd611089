"""The per-encoder stages: prepare (a CPU task, or inside the actor) and encode (an actor).
No Ray imports: the adapter applies them with ``map_batches``."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from encoders import FAMILIES
from encoders.core.node_weights import weights_on_this_node
from encoders.core.retry import configure as configure_retries
from encoders.core.spec import EncoderSpec
from encoders.core.weights import ResolvedWeights
from pipeline.columns import (
    embedding_column,
    error_column,
    extra_columns,
    extra_to_arrow,
    prepared_column,
    vectors_to_arrow,
)
from pipeline.faults import RowGuard, prepare_rows
from pipeline.webdataset import read_errors

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _weights_here(weights: ResolvedWeights) -> ResolvedWeights:
    # The driver's weights path is valid on the driver's machine. Each node resolves the same
    # weights once (a file lock), however many tasks and actors run there.
    return weights_on_this_node(weights)


def prepare_batch(batch: pa.Table, spec: EncoderSpec, retried_io_errors: list[str] | None = None) -> pa.Table:
    """CPU work (tokenize, decode, resample): input column -> compact prepared values + errors.
    A file a row names is read with transient storage errors retried (encoders/core/retry.py)."""
    configure_retries(retried_io_errors)
    spec = replace(spec, weights=_weights_here(spec.weights))  # the tokenizer lives with the weights
    family = FAMILIES.get(spec.family)
    unread = read_errors(batch)  # a WebDataset member that could not become a value
    for modality, column in spec.columns.items():
        values = batch.column(column).combine_chunks()
        prepared = prepare_rows(lambda part, m=modality: family.prepare(spec, m, part), values)
        errors = prepared.errors
        if unread is not None:
            errors = [row.get(column) or error for row, error in zip(unread, errors)]
        batch = batch.append_column(prepared_column(spec, modality), prepared.values)
        batch = batch.append_column(error_column(spec, modality), pa.array(errors, pa.string()))
    return batch


def prepare_chunk(
    batch: pa.Table, spec: EncoderSpec, rows: int, retried_io_errors: list[str] | None = None
) -> Iterator[pa.Table]:
    """``prepare_batch`` over a whole chunk (a read fused with this stage hands over one),
    ``rows`` at a time, each slice yielded as it is done. Ray Data gathers the slices into
    blocks of its target size (128 MiB) and ships each one full: memory holds one block and
    one slice, never a chunk's prepared values (1,024 clips of 10 MiB)."""
    for start in range(0, max(batch.num_rows, 1), rows):
        yield prepare_batch(batch.slice(start, rows), spec, retried_io_errors)


class EncodeActor:
    """One loaded model per actor: prepared values in, vectors out, in input order."""

    def __init__(
        self,
        spec: EncoderSpec,
        threads: int,
        max_tokens: int,
        node_threads: Callable[[], int] | None = None,
        require_native: bool = False,
        prepare_io: list[str] | None = None,
    ) -> None:
        """``prepare_io``: given (the transient I/O errors to retry), the actor prepares each
        batch itself (``prepare_batch``) before encoding it: the input columns arrive raw."""
        import os
        import sys

        import torch

        from encoders.core.allocator import keep_freed_memory
        from encoders.core.device import pick_device

        # One loading bar per actor start only clutters the driver's log. transformers reads this
        # when it is imported (importing it here for the call would cost families that never
        # use it half a second); a worker that already imported it is told directly.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()

        keep_freed_memory()  # a forward's activations reuse the last batch's pages (encoders/core/allocator.py)
        device = pick_device()
        # Ray sets OMP_NUM_THREADS to the CPU reservation; torch should use the idle cores
        # (and this worker may have imported torch for earlier tasks).
        # ``node_threads`` decides from the node this actor landed on (pipeline/cluster.py).
        torch.set_num_threads(node_threads() if node_threads is not None else threads)
        spec = replace(spec, weights=_weights_here(spec.weights))
        self.spec = spec
        self.prepare_io = prepare_io
        self.max_tokens = max_tokens
        self.guard = RowGuard()
        # ``dimensions``: the model gives its own D; the output keeps the first N, renormalized.
        self.model_dim = spec.options.get("model_dim", spec.dim)
        self.model = FAMILIES.get(spec.family).load(replace(spec, dim=self.model_dim), device)
        if require_native:  # the run's precision was resolved on another node (pipeline/precision.py)
            check_native(spec.output, self.model.precision, device)
        self.extras = {modality: extra_columns(spec, modality) for modality in spec.columns}
        log.info(
            "encoder %s loaded on %s (%s, %d threads)",
            spec.output,
            device,
            self.model.precision,
            torch.get_num_threads(),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.prepare_io is not None:
            batch = prepare_batch(batch, self.spec, self.prepare_io)
        for modality in self.spec.columns:
            name = prepared_column(self.spec, modality)
            values = batch.column(name).combine_chunks()

            def encode(part: pa.Array, max_tokens: int, modality: str = modality) -> Any:
                return self.model(modality, part, max_tokens=max_tokens)

            # A row the model fails on becomes encode_failed; a bug stops the job (pipeline/faults.py).
            result, failures = self.guard.encode(encode, values, self.max_tokens, self.model_dim)
            vectors = result.vectors if self.spec.dim == self.model_dim else truncated(result.vectors, self.spec.dim)
            # The vector goes where the prepared value was, before its error column: the column
            # order of embed() on a Dataset is the output schema's.
            batch = batch.drop_columns([name])
            position = batch.column_names.index(error_column(self.spec, modality))
            batch = batch.add_column(
                position, embedding_column(self.spec, modality), vectors_to_arrow(vectors, result.valid)
            )
            if any(failures):
                errors = error_column(self.spec, modality)
                merged = pc.coalesce(batch.column(errors), pa.array(failures, pa.string()))
                batch = batch.set_column(batch.column_names.index(errors), errors, merged)
            for key, column, arrow_type in self.extras[modality]:  # patch grids, window counts
                extra = result.extras.get(key)
                value = (
                    pa.nulls(len(values), arrow_type)
                    if extra is None
                    else extra_to_arrow(extra, result.valid, arrow_type)
                )
                batch = batch.append_column(column, value)
        return batch


def check_native(output: str, precision: str, device: Any) -> None:
    from encoders.core.device import native_reduced
    from encoders.core.fidelity import device_name

    if precision != "fp32" and native_reduced(device) != precision:
        raise RuntimeError(
            f"encoder {output}: the run resolved precision: auto to {precision} on another node, and this node "
            f"({device_name(device)}) does not compute {precision} natively; one run never mixes precisions: "
            f"set precision: fp32 (or {precision}) on the encoder"
        )


def truncated(vectors: Any, n: int) -> Any:
    """The first ``n`` values of each vector, L2-normalized again (a zero vector stays zero)."""
    import numpy as np

    head = np.ascontiguousarray(vectors[:, :n], dtype=np.float32)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return head / np.maximum(norms, 1e-12)
