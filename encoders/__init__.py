"""Encoders by modality over a small shared core. No Ray imports here: actors and tasks live in
pipeline/.

- ``core/``: registry, spec and family interface, weights resolution, device and precision,
  pooling, batching, errors, input files, the D probe.
- ``text/``, ``image/``, ``audio/``, ``multimodal/``: one package per modality; each family has a
  prepare half (CPU tasks) and a model half (the actor).

Importing this package registers every family and model alias by name only (the modality
catalogs below); a family's module, and torch, load on its first ``FAMILIES.get``.
"""

from encoders import audio, image, multimodal, text  # noqa: F401  (the catalogs: families and aliases as data)
from encoders.core.registry import FAMILIES, MODELS, MissingDependencyError, ModelAlias, register_model
from encoders.core.weights import ResolvedWeights, WeightsNotFoundError, resolve_weights

__all__ = [
    "FAMILIES",
    "MODELS",
    "MissingDependencyError",
    "ModelAlias",
    "ResolvedWeights",
    "WeightsNotFoundError",
    "register_model",
    "resolve_weights",
]
