"""The chunk read: one Ray Data read task per planned chunk, its rows cut into blocks of an
encoder batch, fused with the first prepare stage so that no separate read stage competes with
prepare for the CPUs the encoder actors leave."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.adapter import read_remote_args, resolve_task_stage
from pipeline.chunk_read import chunk_dataset
from pipeline.chunks import plan_sources
from pipeline.config import SourceConfig, StageResources
from pipeline.dedupe import find_duplicates
from pipeline.progress import account
from pipeline.sources import CHUNK_COLUMN, read_chunk_rows
from pipeline.tasks import LocalTasks

SIZES = (10, 7, 1)  # rows of each Parquet file: one chunk each


def _plan(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for f, rows in enumerate(SIZES):
        table = pa.table({"id": [f"f{f}-{r}" for r in range(rows)], "text": [f"text {f} {r}" for r in range(rows)]})
        pq.write_table(table, folder / f"part{f}.parquet")
    tasks = LocalTasks()
    chunks = plan_sources([SourceConfig(path=str(folder), id_column="id")], tasks)
    return account(chunks, find_duplicates(chunks.chunks, "error", tasks), None, "/nonexistent", tasks)


def _batch_rows(batch: pa.Table) -> pa.Table:
    """The prepare stand-in: tags each row with its batch's size and chunks."""
    tags = sorted(set(batch.column(CHUNK_COLUMN).to_pylist()))
    batch = batch.append_column("batch_rows", pa.array([batch.num_rows] * batch.num_rows, pa.int64()))
    return batch.append_column("batch_chunks", pa.array(["|".join(tags)] * batch.num_rows, pa.string()))


def test_small_chunks_fuse_with_prepare_unless_the_read_has_resources_of_its_own():
    prepare = resolve_task_stage(StageResources(memory=2**30, resources={"cpu_slot": 1}), 64)
    remote, fused = read_remote_args(StageResources(), prepare, small_chunks=True)
    assert fused and remote == {"num_cpus": 1.0, "memory": 2**30, "resources": {"cpu_slot": 1}}
    # A large chunk would be prepared serially in one task: a read of its own (one CPU, as Ray
    # Data's block cutting has, so the two fuse), and prepare fans out.
    remote, fused = read_remote_args(StageResources(), prepare, small_chunks=False)
    assert not fused and remote == {"num_cpus": 1.0}
    # resources.read is the user's: used as given, and never fused.
    for small in (True, False):
        remote, fused = read_remote_args(StageResources(cpus=2, resources={"io": 1}), prepare, small)
        assert not fused and remote == {"num_cpus": 2, "resources": {"io": 1}}


def _read(tmp_path, read_cpus, block_rows, batch_size, block_bytes=None):
    """The chunks read with ``read_cpus`` into a stand-in prepare of 0.5 CPU ->
    (rows, the rows read_chunk_rows gives, the materialized Dataset)."""
    import ray

    plan = _plan(tmp_path)
    assert plan.chunks.num_rows == len(SIZES)
    kwargs = {"schema": plan.schema, "output": "/nonexistent"}
    every = pa.table({"id": list(range(plan.chunks.num_rows))})
    expected = read_chunk_rows(every, plan.chunks, **kwargs)  # every chunk's rows in one call
    dataset = chunk_dataset(plan.chunks, kwargs, {"num_cpus": read_cpus}, block_rows, block_bytes).map_batches(
        _batch_rows, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True, num_cpus=0.5
    )
    done = dataset.materialize()
    table = pa.concat_tables(ray.get(ref) for ref in done.to_arrow_refs()).sort_by("id")
    assert table.drop_columns(["batch_rows", "batch_chunks"]).equals(expected.sort_by("id"))
    return table, done


def test_a_fused_read_hands_each_chunk_whole_to_the_prepare_in_its_task(ray_session, tmp_path):
    table, done = _read(tmp_path, 0.5, None, None)
    # One task reads a chunk and runs the next stage on it: no separate read operator.
    operators = [line.split(":")[0] for line in done.stats().splitlines() if line.startswith("Operator ")]
    assert operators == ["Operator 1 ReadChunks->MapBatches(_batch_rows)"]
    assert done.num_blocks() == len(SIZES)
    assert sorted(set(table.column("batch_rows").to_pylist())) == sorted(SIZES)  # a batch is one whole chunk
    assert all("|" not in tags for tags in table.column("batch_chunks").to_pylist())


def test_a_fused_read_cuts_its_output_to_the_runs_block_bytes(ray_session, tmp_path):
    """CPU runs ship a chunk in blocks of CPU_BLOCK_BYTES, not one block per chunk; here a
    block target of a few rows' bytes cuts each chunk into blocks of a few rows. The setting
    stays with this Dataset: Ray Data's context for the next one is untouched."""
    from ray.data import DataContext

    default = DataContext.get_current().target_max_block_size
    table, done = _read(tmp_path, 0.5, None, None, block_bytes=256)
    assert done.num_blocks() > len(SIZES)
    assert max(table.column("batch_rows").to_pylist()) < max(SIZES)
    assert all("|" not in tags for tags in table.column("batch_chunks").to_pylist())  # still one chunk a task
    assert DataContext.get_current().target_max_block_size == default


def test_a_read_of_its_own_cuts_chunks_into_batches_for_parallel_prepares(ray_session, tmp_path):
    table, done = _read(tmp_path, 1.0, 4, 4)
    operators = [line.split(":")[0] for line in done.stats().splitlines() if line.startswith("Operator ")]
    assert operators[-2:] == [
        "Operator 2 MapBatches(Read)->StreamingRepartition[num_rows_per_block=4,strict=False]",
        "Operator 3 MapBatches(_batch_rows)",
    ]
    # Blocks of at most 4 rows, however large the chunk: the 10-row chunk is 4 + 4 + 2.
    assert max(table.column("batch_rows").to_pylist()) == 4


def test_prepare_chunk_yields_each_slice_as_prepare_batch_gives_it(tmp_path):
    from pipeline.cluster import ClusterShape
    from pipeline.plan import as_config, plan
    from pipeline.stages import prepare_batch, prepare_chunk
    from tests.image_data import encode, real_photos

    photos = sorted(real_photos().items())[:5]
    paths = []
    for name, array in photos:
        (tmp_path / f"{name}.jpg").write_bytes(encode(array))
        paths.append(str(tmp_path / f"{name}.jpg"))
    paths.append(str(tmp_path / "missing.jpg"))  # an error value, in its own slice's place
    source = {"path": str(tmp_path), "kind": "image"}
    encoder = {"output": "image", "column": "image", "model": "efficientnet-lite0"}
    config = as_config({"sources": [source], "encoders": [encoder], "output": {"path": str(tmp_path / "out")}})
    spec = plan(config, ClusterShape(cpus=2, gpus=0))[0].spec
    chunk = pa.table({"id": [f"r{i}" for i in range(len(paths))], "image": paths})

    parts = list(prepare_chunk(chunk, spec, rows=4))
    assert [p.num_rows for p in parts] == [4, 2]
    assert pa.concat_tables(parts).equals(prepare_batch(chunk, spec))
    assert pa.concat_tables(parts).column("image_error").to_pylist()[-1].startswith("missing_file")
    empty = list(prepare_chunk(chunk.slice(0, 0), spec, rows=4))  # a chunk whose rows all went
    assert len(empty) == 1 and empty[0].num_rows == 0 and empty[0].schema.equals(parts[0].schema)
