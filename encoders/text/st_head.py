"""The modules a sentence-transformers folder runs after its Pooling (``Dense``, ``LayerNorm``,
``Normalize``, ...), run by sentence-transformers' own classes, so that the vectors and D are the
ones ``SentenceTransformer(folder).encode`` gives.

A folder whose only module after Pooling is ``Normalize`` needs none of this: hf-text normalizes
itself. Classes outside the ``sentence_transformers`` namespace are code chosen by the folder,
and load only with ``trust_remote_code``. sentence-transformers is the ``st`` extra (pulled in by
``weights``); without it such a folder is a one-line error naming the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from encoders.core.registry import MissingDependencyError

Head = tuple[tuple[str, str], ...]  # (module type, path inside the folder), in the folder's order


def head_classes(head: Head, root: str, trust_remote_code: bool) -> list[type]:
    """The module classes, imported under sentence-transformers' own trust rule."""
    try:
        from sentence_transformers.util import import_module_class
    except ImportError:
        names = ", ".join(kind.rpartition(".")[2] for kind, _ in head)
        raise MissingDependencyError(
            f"the folder's modules after Pooling ({names}) need the Python package 'sentence-transformers': "
            "pip install 'omniembed[st]'"
        ) from None
    classes = []
    for kind, _ in head:
        if not trust_remote_code and not kind.startswith("sentence_transformers."):
            raise ValueError(
                f"the folder's module {kind!r} is code outside sentence-transformers, chosen by the folder; it loads "
                "only with the option trust_remote_code: true"
            )
        try:
            classes.append(import_module_class(kind, root, trust_remote_code=trust_remote_code))
        except (ImportError, AttributeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"the folder's module {kind!r} cannot be loaded: {first}") from None
    return classes


def load_head(head: Head, root: str, trust_remote_code: bool) -> torch.nn.Sequential:
    """The modules, loaded from their sub-folders, as one float32 ``Sequential`` on the CPU."""
    modules = [
        cls.load(root, subfolder=path, local_files_only=True, trust_remote_code=trust_remote_code)
        for cls, (_, path) in zip(head_classes(head, root, trust_remote_code), head)
    ]
    return torch.nn.Sequential(*modules).float().eval()


def run_head(head: torch.nn.Module, pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pooled vectors through the modules, with the features sentence-transformers hands them."""
    features = {"sentence_embedding": pooled, "token_embeddings": tokens, "attention_mask": mask}
    return head(features)["sentence_embedding"]


def head_files(head: Head, root: str) -> Sequence[Path]:
    """The module sub-folders whose weights take part in the weights hash."""
    return [Path(root) / path for _, path in head if path and (Path(root) / path).is_dir()]


def describe(head: Head) -> list[str]:
    """The modules' class names, for the output metadata."""
    return [kind.rpartition(".")[2] for kind, _ in head]


def as_head(value: Any) -> Head:
    return tuple((str(kind), str(path)) for kind, path in value or ())
