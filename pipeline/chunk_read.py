"""The planned chunks as a Ray Data source for runs whose chunks are all small (folder groups,
small files): one read task per chunk, with the first prepare stage's resources, so Ray Data
fuses the two. One task reads a chunk and decodes, tokenizes or resamples it a batch at a time
(``pipeline.stages.prepare_chunk``), shipping each block of Ray Data's target size as it fills.
``pipeline.adapter.read_remote_args`` decides; larger chunks keep a read of their own whose
blocks fan out to parallel prepare tasks.

Why: a read of its own competes with prepare for the CPUs that encoder actors leave, and Ray
Data runs first the operator with the smaller object-store footprint. A read of paths always
is, so on a node with one CPU left beside the actors nothing was prepared until every chunk
had been read: for 7,200 clips on two cores, 25 s of idle encoders, longer the more chunks.

When every encoder runs on CPUs the fused output is cut into blocks of ``CPU_BLOCK_BYTES``
instead of Ray Data's 128 MiB: a chunk of 256 clips or images was one block, so the first
actor waited for a whole chunk's decode and the second for the next, and the last block ran on
one actor while the other had none. 2,400 clips on two cores: 68.7 and 68.9 s at 128 MiB, 62.6
and 62.7 s at 32 MiB, 63.2 s at 16 MiB. GPU actors keep the larger blocks: one takes a 32 MiB
block in a fraction of a second, and on a large cluster the driver would schedule 4x the tasks.
"""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa

from pipeline.adapter import named
from pipeline.sources import read_chunk_rows

CPU_BLOCK_BYTES = 32 * 2**20  # fused read+prepare output blocks when every encoder is on CPUs


def _chunk_datasource(chunks_ref: Any, kwargs_ref: Any, n: int) -> Any:
    """Chunk ordinals -> read tasks. The chunk table and the read's arguments are object refs:
    each task carries its ordinal and two refs, never a copy of the table. (Ray Data is
    imported here, not at module import: the CLI checks a config before Ray loads.)"""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ChunkDatasource(Datasource):
        def get_name(self) -> str:
            return "Chunks"  # the operator shows as ReadChunks->MapBatches(Prepare[...])

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None):
            unknown = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [
                ReadTask(_ReadOne(i, chunks_ref, kwargs_ref), unknown, per_task_row_limit=per_task_row_limit)
                for i in range(n)
            ]

    return ChunkDatasource()


def chunk_dataset(
    chunks: pa.Table,
    read_kwargs: dict[str, Any],
    remote_args: dict[str, Any],
    block_rows: int | None,
    block_bytes: int | None = None,
) -> Any:
    """A Dataset of the chunks' rows (``read_chunk_rows``' output), read by tasks with
    ``remote_args`` (``pipeline.adapter.read_remote_args``). ``block_rows`` None: one task per
    chunk, for a prepare fused with the read, whose output Ray Data cuts into blocks of its
    target size, ``block_bytes`` for this run's Dataset when given (``CPU_BLOCK_BYTES``).
    Otherwise a read stage of its own, each chunk cut into blocks of ``block_rows`` inside the
    read task, which prepare tasks take in parallel (Ray Data never splits a block across tasks)."""
    import ray

    n = chunks.num_rows
    if block_rows is None:
        source = _chunk_datasource(ray.put(chunks), ray.put(read_kwargs), n)
        dataset = ray.data.read_datasource(source, override_num_blocks=max(1, n), **remote_args)
        if block_bytes:  # the Dataset's own copy of the context: this run only
            dataset.context.target_max_block_size = block_bytes
        return dataset
    kwargs = {**read_kwargs, "chunks": chunks}
    dataset = ray.data.range(n, override_num_blocks=n).map_batches(
        named(read_chunk_rows, "Read"), batch_size=1, batch_format="pyarrow", fn_kwargs=kwargs, **remote_args
    )
    return dataset.repartition(target_num_rows_per_block=block_rows)


class _ReadOne:
    def __init__(self, ordinal: int, chunks_ref: Any, kwargs_ref: Any) -> None:
        self.ordinal, self.chunks_ref, self.kwargs_ref = ordinal, chunks_ref, kwargs_ref

    def __call__(self) -> Iterator[pa.Table]:
        import ray

        chunks, kwargs = ray.get([self.chunks_ref, self.kwargs_ref])
        yield read_chunk_rows(pa.table({"id": [self.ordinal]}), chunks, **kwargs)
