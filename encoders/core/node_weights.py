"""Weights on the node an actor runs on, resolved once per node rather than once per actor.

The driver resolves a model reference on its own machine; that path means nothing on another
node. Each encoder actor re-resolves on its node under a per-node file lock: the first actor
on a node fetches from the hub, and the others wait for it and then find the local cache,
instead of every actor downloading the same snapshot at once.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

from encoders.core.weights import ResolvedWeights, WeightsNotFoundError, resolve_weights

# /tmp is per node; one lock file per model and revision.
LOCK_DIR = Path(tempfile.gettempdir()) / "omniembed-weights"
LOCK_TIMEOUT_S = 3600.0  # a large snapshot on a slow link


def lock_path(weights: ResolvedWeights, lock_dir: Path = LOCK_DIR) -> Path:
    key = hashlib.sha256(f"{weights.reference}@{weights.revision}".encode()).hexdigest()[:24]
    return lock_dir / f"{key}.lock"


def weights_on_this_node(
    weights: ResolvedWeights,
    fetch: Callable[[ResolvedWeights], ResolvedWeights] | None = None,
    lock_dir: Path = LOCK_DIR,
) -> ResolvedWeights:
    """The same weights (same reference and revision) at a path valid on this node."""
    if weights.source == "local":
        if not Path(weights.path).exists():
            raise WeightsNotFoundError(
                f"model path {weights.path!r} does not exist on this node; "
                "on a cluster, put local models on a shared filesystem"
            )
        return weights
    if weights.source == "bundled" and Path(weights.path).exists():
        return weights  # installed with the package on every node
    from filelock import FileLock

    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path(weights, lock_dir)), timeout=LOCK_TIMEOUT_S):
        return (fetch or _fetch)(weights)


def _fetch(weights: ResolvedWeights) -> ResolvedWeights:
    if weights.source == "bundled":
        return resolve_weights(weights.reference)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # the node's cache first: every actor after the first one on a node stops here
        folder = snapshot_download(weights.reference, revision=weights.revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        folder = snapshot_download(weights.reference, revision=weights.revision, etag_timeout=10)
    return replace(weights, path=folder)
