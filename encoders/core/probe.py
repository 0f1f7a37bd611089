"""The output dimension D from a one-input probe, cached per model and options on disk.

``hidden_size`` is not trusted: pooling, projection heads and chunking decide D.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from encoders.core.spec import Options, SpecRequest


def cache_path(name: str = "probed_dims.json") -> Path:
    """``name`` under this node's cache: ``$OMNIEMBED_CACHE``, else ``~/.cache/omniembed``."""
    root = os.environ.get("OMNIEMBED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "omniembed"
    )
    return Path(root) / name


def cached_probe(key_parts: dict, probe: Callable[[], int]) -> int:
    return int(cached_json("probed_dims.json", key_parts, probe))


def cached_json(
    name: str, key_parts: dict, compute: Callable[[], Any], keep: Callable[[Any], bool] = lambda value: True
) -> Any:
    """``compute()``'s JSON value, kept on disk (this node) under a hash of ``key_parts`` when
    ``keep(value)``."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()
    path = cache_path(name)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = compute()
    if not keep(value):
        return value
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a probe next time
    return value


def meta_dim(build: Callable[[], Any], run: Callable[[Any], Any]) -> int | None:
    """D from a forward on the meta device: shapes only, no weight read and no memory for them.
    None when the model cannot run there (a data-dependent op); the CPU probe decides then."""
    import torch

    try:
        with torch.device("meta"), torch.no_grad():
            return int(run(build()).shape[-1])
    except Exception:  # noqa: BLE001 - any failure on meta only means: probe on the CPU
        return None


def spec_with_dim(family: Any, request: SpecRequest, options: Options, sha: str | None = None, **probe_key: Any) -> Any:
    """The family's EncoderSpec with D: the registry's ``dim`` when given, else the family's
    ``meta_dim(spec)`` (its forward on the meta device, see ``meta_dim``, or its config where
    that is exact), else one CPU probe of the loaded model, cached under the family, weights
    hash (``sha``, by default the hash of the request's weights), model and ``probe_key``.
    ``hidden_size`` and the like are not trusted."""
    import torch

    from encoders.core.weights import weights_sha256

    sha = sha or weights_sha256(request.weights.path)
    if request.dim is not None:
        return request.spec(family.name, sha, options, request.dim)
    dim = family.meta_dim(request.spec(family.name, sha, options, 0))
    if dim:
        return request.spec(family.name, sha, options, dim)
    key = {"family": family.name, "sha": sha, "model": request.weights.reference, **probe_key}
    dim = cached_probe(key, lambda: family.load(request.spec(family.name, sha, options, 0), torch.device("cpu")).dim)
    return request.spec(family.name, sha, options, dim)
