"""Stage batches and parts sized by bytes where rows are large: decoded audio windows, and raw
bytes columns that travel with every row. Without Ray: planning and accounting only."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import chunks as chunks_module
from pipeline.chunks import plan_sources
from pipeline.cluster import ClusterShape
from pipeline.config import SourceConfig, config_from_dict
from pipeline.dedupe import find_duplicates
from pipeline.plan import BATCH_BYTES, DEFAULT_BATCH_ROWS, PART_BYTES, default_part_rows, plan, sized_for_input
from pipeline.progress import account
from pipeline.tasks import LocalTasks

TASKS = LocalTasks()
TWO_CORES = ClusterShape(cpus=2, gpus=0)
MIB = 2**20


def config(model, path="x", column="text", **encoder):
    return config_from_dict(
        {
            "sources": [{"path": path, "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [{"output": "v", "column": column, "model": model, **encoder}],
        }
    )


def test_large_parquet_rows_cut_chunks_batches_and_parts(tmp_path, tiny_bert, monkeypatch):
    """100 rows of 1 MiB bytes each, in row groups of 10: chunks end at CHUNK_BYTES, and the
    text encoder's batch (2048 rows by default) and the part (2048) shrink to their byte
    budgets, because the bytes column is passed through every stage."""
    blobs = [bytes([i]) * MIB for i in range(100)]
    path = tmp_path / "blobs.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(100)], "text": [f"row {i}" for i in range(100)], "blob": blobs})
    pq.write_table(table, path, row_group_size=10, compression="none")
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", 25 * MIB)
    chunk_plan = plan_sources([SourceConfig(path=str(path), id_column="id")], TASKS)
    assert chunk_plan.chunks.column("rows").to_pylist() == [30, 30, 30, 10]
    sizes = chunk_plan.chunks.column("bytes").to_pylist()
    assert all(rows * MIB <= size < rows * MIB * 1.01 for rows, size in zip([30, 30, 30, 10], sizes))

    reads = account(chunk_plan, find_duplicates(chunk_plan.chunks, "error", TASKS), None, str(tmp_path / "o"), TASKS)
    assert MIB <= reads.row_bytes < 1.01 * MIB
    cfg = config(tiny_bert, str(path))
    plans = plan(cfg, TWO_CORES)
    assert plans[0].encode.batch_size == DEFAULT_BATCH_ROWS["text"]  # paths or short text: rows decide
    sized = sized_for_input(plans, cfg, reads.row_bytes)[0]
    assert sized.encode.batch_size == sized.prepare.batch_size == BATCH_BYTES // reads.row_bytes
    assert 100 < sized.encode.batch_size < 128
    part = default_part_rows([sized], reads.row_bytes)
    assert (part + 1) * reads.row_bytes > PART_BYTES >= part * reads.row_bytes and part < 2048
    assert default_part_rows(plans, 0) == 2048  # small rows keep about a minute of work a part

    # A batch the user sets is taken as given.
    mine = config(tiny_bert, str(path), resources={"batch_rows": 500})
    assert sized_for_input(plan(mine, TWO_CORES), mine, reads.row_bytes)[0].encode.batch_size == 500


def test_folder_groups_of_paths_count_no_bytes(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("x" * 10_000)
    chunk_plan = plan_sources([SourceConfig(path=str(folder), kind="text")], TASKS)
    assert chunk_plan.chunks.column("bytes").to_pylist() == [0]


def test_audio_windows_cut_the_encode_batch():
    """aiSFX at 44.1 kHz with 64 windows keeps up to 3.3 M float32 samples (13 MB) a row: a
    32-row batch (426 MB) becomes 10 rows."""
    pytest.importorskip("aisfx", reason="pip install --no-deps aisfx==0.1.2")
    cfg = config("aisfx", column="audio", max_windows=64)
    encode = plan(cfg, TWO_CORES)[0].encode
    row = 4 * (102400 + 63 * 51200)
    assert encode.batch_size == BATCH_BYTES // row == 10
    small = plan(config("aisfx", column="audio", max_windows=8), TWO_CORES)[0].encode
    assert small.batch_size == DEFAULT_BATCH_ROWS["audio"]  # 8 windows: 1.8 MB a row, 32 fit


def test_text_encoders_run_one_thread_per_actor_on_cpu(tiny_bert):
    """Text's measured preference (encoders/text/hf_text.py): two 1-thread actors on two cores,
    one CPU reserved in all; the user's own threads still win."""
    encode = plan(config(tiny_bert), TWO_CORES)[0].encode
    assert (encode.num_cpus, encode.pool, encode.threads) == (0.5, (2, 2), 1)
    mine = plan(config(tiny_bert, resources={"threads": 2}), TWO_CORES)[0].encode
    assert (mine.num_cpus, mine.pool, mine.threads) == (1.0, (1, 1), 2)
