"""A Lance output on the session's Ray: opened with ``lance`` and searched for a nearest
neighbour, resumed after a killed driver, read by the downstream jobs, and indexed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.graph import run

lance = pytest.importorskip("lance", reason="pip install 'omniembed[lance]'")


def config(src, out, model, **output):
    return {
        "sources": [{"path": str(src), "id_column": "id"}],
        "encoders": [{"output": "text", "column": "text", "model": model}],
        "output": {"path": str(out), "format": "lance", "commit_seconds": 0, "rows_per_file": 10, **output},
    }


@pytest.fixture
def texts(tmp_path, real_texts):
    rows = real_texts[:58] + ["", "   "]  # two empty texts: error rows with null vectors
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [f"r{i:02d}" for i in range(60)], "text": rows}), src)
    return src


def test_lance_output_opens_and_finds_nearest_neighbours(ray_session, tiny_bert, texts, tmp_path):
    out = tmp_path / "out.lance"
    manifest = run(config(texts, out, tiny_bert))
    assert manifest["status"] == "failed_error_rate" and manifest["rows"] == 60  # 2 of 60 empty: past 1%
    dataset = lance.dataset(str(out))
    assert dataset.count_rows() == 60 and len(dataset.versions()) >= 2  # one version per commit
    field = dataset.schema.field("text_embedding")
    assert field.type == pa.list_(pa.float32(), 32)  # what Lance indexes, whatever vector_type says
    meta = json.loads(dataset.schema.metadata[b"omniembed"])
    assert meta["version"] == manifest["version"] and meta["encoders"]["text"]["dim"] == 32
    table = dataset.to_table().sort_by("id")
    assert table.column("id").to_pylist() == [f"r{i:02d}" for i in range(60)]
    errors = table.column("text_error").to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [58, 59] and table.column("text_embedding")[58].as_py() is None
    query = np.array(table.column("text_embedding")[7].as_py(), np.float32)
    hits = dataset.to_table(nearest={"column": "text_embedding", "q": query, "k": 3}).column("id").to_pylist()
    assert hits[0] == "r07" and not {"r58", "r59"} & set(hits)  # error rows are never returned


def test_resume_into_a_lance_output_after_a_killed_driver(ray_session, tiny_bert, texts, tmp_path):
    """The driver died after Lance committed a part's fragments but before the commit log held
    its record: the next run removes those fragments and embeds their rows again, once."""
    out = tmp_path / "out.lance"
    clean = run(config(texts, out, tiny_bert, max_error_rate=0.5))
    reference = {r["id"]: r["text_embedding"] for r in lance.dataset(str(out)).to_table().to_pylist()}
    manifest = json.loads((out / "_manifest.json").read_text())
    lost = manifest["files"].pop()
    manifest["status"] = "running"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert lance.dataset(str(out)).count_rows() == 60  # the lost part's fragments are still in Lance

    resumed = run(config(texts, out, tiny_bert, max_error_rate=0.5))
    assert resumed["status"] == "complete" and resumed["timing"]["rows_this_run"] == lost["rows"]
    table = lance.dataset(str(out)).to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 60 == clean["rows"]
    for row in table.to_pylist():
        if reference[row["id"]] is None:
            assert row["text_embedding"] is None
        else:
            np.testing.assert_allclose(row["text_embedding"], reference[row["id"]], atol=1e-5)


def test_search_job_reads_a_lance_output_and_an_index_is_built(ray_session, tiny_bert, texts, tmp_path):
    from jobs.vectors import open_dataset

    out = tmp_path / "out.lance"
    manifest = run(config(texts, out, tiny_bert, max_error_rate=0.5, index="ivf_flat"))
    assert manifest["status"] == "complete" and manifest["warnings"] == []
    assert [i["fields"] for i in lance.dataset(str(out)).list_indices()] == [["text_embedding"]]
    dataset = open_dataset(str(out))
    assert dataset.vector_columns == ["text_embedding"] and dataset.metadata["encoders"]["text"]["dim"] == 32
    assert dataset.read(["id", "text_embedding"]).num_rows == 60


def test_a_lance_dataset_omniembed_did_not_write_is_refused(ray_session, tiny_bert, texts, tmp_path):
    from pipeline.config import ConfigError

    out = tmp_path / "theirs.lance"
    lance.write_dataset(pa.table({"x": [1, 2]}), str(out))
    with pytest.raises(ConfigError, match="is a Lance dataset omniembed did not write"):
        run(config(texts, out, tiny_bert))
    assert lance.dataset(str(out)).to_table().column("x").to_pylist() == [1, 2]
