"""Weights are resolved once per node, not once per actor: two processes (two actors on one
node) ask for the same hub weights at the same time, and only one of them fetches."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from encoders.core.node_weights import weights_on_this_node
from encoders.core.weights import ResolvedWeights, WeightsNotFoundError


class SlowHub:
    """A fetch that downloads only when the node's cache lacks the snapshot, slowly enough
    that two unlocked callers would both download."""

    def __init__(self, cache: Path, log: Path) -> None:
        self.cache, self.log = cache, log

    def __call__(self, weights: ResolvedWeights) -> ResolvedWeights:
        folder = self.cache / weights.revision
        if not folder.exists():
            with open(self.log, "a") as log:
                log.write("download\n")
            time.sleep(1.0)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model.safetensors").write_bytes(b"weights")
        return ResolvedWeights(str(folder), weights.reference, weights.revision, weights.source)


def _actor(cache: str, log: str, locks: str, out: str, start: float) -> None:
    time.sleep(max(0.0, start - time.time()))  # both "actors" start together
    driver_side = ResolvedWeights("/driver/only/path", "owner/model", "abc123", "hub")
    got = weights_on_this_node(driver_side, fetch=SlowHub(Path(cache), Path(log)), lock_dir=Path(locks))
    Path(out).write_text(got.path)


def _run_two(tmp_path: Path) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 3.0
    procs = [
        ctx.Process(
            target=_actor,
            args=(
                str(tmp_path / "cache"),
                str(tmp_path / "log"),
                str(tmp_path / "locks"),
                str(tmp_path / f"out{i}"),
                start,
            ),
        )
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [(tmp_path / f"out{i}").read_text() for i in range(2)]


def test_two_actors_on_one_node_fetch_once(tmp_path):
    paths = _run_two(tmp_path)
    assert (tmp_path / "log").read_text().splitlines() == ["download"]
    assert paths[0] == paths[1] == str(tmp_path / "cache" / "abc123")


def test_without_the_lock_both_would_fetch(tmp_path):
    """The fake really races: unlocked, two concurrent callers both download."""
    hub = SlowHub(tmp_path / "cache", tmp_path / "log")
    weights = ResolvedWeights("/driver/only/path", "owner/model", "abc123", "hub")
    import threading

    threads = [threading.Thread(target=hub, args=(weights,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "log").read_text().splitlines() == ["download", "download"]


def test_local_and_bundled_paths_are_used_as_they_are(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    local = ResolvedWeights(str(model), "local:model", None, "local")
    assert weights_on_this_node(local, fetch=lambda w: pytest.fail("no fetch for a local path")) is local
    with pytest.raises(WeightsNotFoundError, match="shared filesystem"):
        weights_on_this_node(ResolvedWeights(str(tmp_path / "absent"), "local:absent", None, "local"))
