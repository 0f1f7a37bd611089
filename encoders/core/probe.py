"""The output dimension D from a one-input probe, cached per model and options on disk.

``hidden_size`` is not trusted: pooling, projection heads and chunking decide D.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping


def _cache_file() -> Path:
    root = os.environ.get("OMNIEMBED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "omniembed")
    return Path(root) / "probed_dims.json"


def cached_probe(key_parts: dict, probe: Callable[[], int]) -> int:
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return int(cache[key])
    dim = int(probe())
    cache[key] = dim
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a probe next time
    return dim


def spec_with_dim(family: Any, output: str, columns: Mapping[str, str], weights: Any, sha: str,
                  options: Mapping[str, Any], dim: int | None, **probe_key: Any) -> Any:
    """The family's EncoderSpec with D: the registry's ``dim`` when given, else one CPU probe of
    the loaded model, cached under the family, weights hash, model and ``probe_key``."""
    import torch

    from encoders.core.spec import EncoderSpec

    spec = EncoderSpec(output, family.name, dict(columns), weights, dim or 0, sha, options)
    if dim is None:
        key = {"family": family.name, "sha": sha, "model": weights.reference, **probe_key}
        dim = cached_probe(key, lambda: family.load(spec, torch.device("cpu")).dim)
    return EncoderSpec(output, family.name, dict(columns), weights, dim, sha, options)
