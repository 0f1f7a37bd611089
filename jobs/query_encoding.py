"""Embedding queries with the encoder recorded in a dataset's metadata, through the pipeline's
own plan -> prepare -> encode path (no second implementation of any model).

The model reference comes from, in order: ``--model``; the run's config in ``_manifest.json``
(the reference as the user gave it, with the same options); the metadata's hub id. A
``local:<name>`` model needs one of the first two. Whatever resolves must have the weights
hash the metadata records, or the query would land in another space: that is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from encoders.core.spec import EncoderSpec
from jobs.entrypoint import JobError
from jobs.vectors import Dataset, EncoderEntry
from pipeline.config import ConfigError, EncoderConfig

log = logging.getLogger(__name__)
# Spec options the families derive themselves (recorded, but not accepted back as options).
DERIVED_OPTIONS = ("patch_grid",)


@dataclass
class QueryEncoder:
    spec: EncoderSpec
    model: Any

    def modalities(self) -> tuple[str, ...]:
        from encoders import FAMILIES

        return tuple(FAMILIES.get(self.spec.family).modalities)

    def check_modality(self, modality: str) -> None:
        if modality not in self.modalities():
            raise JobError(
                f"encoder {self.spec.output!r} ({self.spec.family}) embeds {', '.join(self.modalities())}, "
                f"not {modality}; query this column with a {' or '.join(self.modalities())} query or an --id"
            )

    def encode(self, modality: str, values: Sequence[Any]) -> np.ndarray:
        """Texts, or image paths/bytes -> (n, D) float32, as the pipeline would have embedded them."""
        from encoders import FAMILIES

        self.check_modality(modality)
        family = FAMILIES.get(self.spec.family)
        prepared = family.prepare(self.spec, modality, pa.array(list(values)))
        bad = [(v, e) for v, e in zip(values, prepared.errors) if e is not None]
        if bad:
            raise JobError(f"the {modality} query {str(bad[0][0])[:60]!r} cannot be embedded: {bad[0][1]}")
        result = self.model(modality, prepared.values, max_tokens=8192)
        vectors, valid = result.vectors, result.valid
        if not np.all(valid):
            raise JobError(f"the {modality} query is empty; give a non-empty {modality}")
        return np.asarray(vectors, dtype=np.float32)


def query_encoder(dataset: Dataset, entry: EncoderEntry, model: str | None = None) -> QueryEncoder:
    import torch
    from transformers.utils import logging as hf_logging

    from encoders import FAMILIES
    from pipeline.plan import plan_encoder

    hf_logging.disable_progress_bar()  # a weights-loading bar per query only clutters the answer

    config = _encoder_config(dataset, entry, model)
    try:
        spec = plan_encoder(config, "--model" if model else f"encoder {entry.output!r}")
    except ConfigError as exc:
        raise JobError(str(exc).splitlines()[0]) from None
    recorded = entry.meta.get("weights_sha256")
    if recorded and spec.weights_sha256 != recorded:
        raise JobError(
            f"model {config.model!r} has weights sha256 {spec.weights_sha256[:12]}..., but column "
            f"{entry.output!r} was embedded with {recorded[:12]}...; pass --model with the same weights"
        )
    if spec.dim != entry.dim:
        raise JobError(f"model {config.model!r} gives {spec.dim}-d vectors, but the dataset's are {entry.dim}-d")
    log.info("query encoder %s: %s (%s)", entry.output, config.model, spec.family)
    return QueryEncoder(spec, FAMILIES.get(spec.family).load(spec, torch.device("cpu")))


def _encoder_config(dataset: Dataset, entry: EncoderEntry, model: str | None) -> EncoderConfig:
    meta = entry.meta
    given = _config_entry(dataset.manifest, entry.output)
    if given is not None:
        options = dict(given.get("options") or {})
        columns = dict(given.get("columns") or meta.get("columns") or {})
        family = given.get("family") or meta.get("family")
        reference = model or given["model"]
    else:
        options = {k: v for k, v in (meta.get("options") or {}).items() if k not in DERIVED_OPTIONS}
        options.update({k: meta[k] for k in ("pooling", "normalize", "max_length") if meta.get(k) is not None})
        columns = dict(meta.get("columns") or {})
        family = meta.get("family")
        reference = model or meta["model"]
    if reference.startswith("local:") or (meta["model"].startswith("local:") and not model and not _exists(reference)):
        raise JobError(
            f"column {entry.output!r} was embedded with a local model folder ({meta['model']}); "
            f"pass --model PATH to that folder"
        )
    return EncoderConfig(entry.output, reference, columns, family, options)


def _config_entry(manifest: Mapping[str, Any] | None, output: str) -> Mapping[str, Any] | None:
    for encoder in ((manifest or {}).get("config") or {}).get("encoders", []):
        if encoder.get("output") == output:
            return encoder
    return None


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).expanduser().exists()
