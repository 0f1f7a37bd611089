"""Fixtures for the jobs: the example data generator at a small size, embedded once per session
with the bundled MiniLM through the real pipeline on the session's Ray."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default; a test's training run is a
# few seconds long, so poll faster (the driver passes this to the controller).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

ROOT = Path(__file__).resolve().parents[2]


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples" / "jobs" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def job_data(tmp_path_factory, ray_session, minilm_path) -> dict[str, str]:
    """Paths of a small version of the example data, and ``items``: its omniembed output."""
    from pipeline.graph import run

    folder = tmp_path_factory.mktemp("jobs-data")
    paths = {
        k: str(v)
        for k, v in load_make_data()
        .write_all(folder / "data", per_topic=30, users=300, transactions=6000, seed=0)
        .items()
    }
    out = folder / "out" / "items"
    run(
        {
            "sources": [{"path": paths["items"], "id_column": "item_id"}],
            "encoders": [{"output": "text", "column": "text", "model": "sentence-transformers/all-MiniLM-L6-v2"}],
            "output": {"path": str(out)},
        }
    )
    return {**paths, "dataset": str(out), "root": str(folder)}
