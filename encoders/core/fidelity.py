"""Reduced precision only where it keeps the vectors: a fidelity probe, cached per model and device.

A device that computes bf16 (or fp16) natively runs a model about twice as fast in it, but some
models lose more than others (benchmarks/: MiniLM keeps cosine 0.99995 to fp32, EfficientNet-Lite0
drops to 0.9985 on random inputs). So ``choose_precision`` embeds a probe batch of real rows in
fp32 and in the reduced precision and keeps the reduced one only when every vector keeps cosine
>= ``MIN_COSINE`` to its fp32 twin, over at least ``MIN_ROWS`` rows (a tiny input keeps fp32
and is not taken as the model's answer). The answer is cached on the node, keyed by the model (weights
hash, options), the device, torch's version and the gate, so a model is measured once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from encoders.core.device import native_reduced
from encoders.core.probe import cached_json

MIN_COSINE = 0.999
MIN_ROWS = 32  # fewer probe rows decide nothing: fp32 for this run, and nothing cached
CACHE_FILE = "precision.json"


def min_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The smallest cosine between paired rows (1.0 for no rows)."""
    if not len(reference):
        return 1.0
    a = torch.as_tensor(np.asarray(reference, np.float32))
    b = torch.as_tensor(np.asarray(candidate, np.float32))
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).min())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{torch.backends.cpu.get_cpu_capability()}:{native_reduced(device) or 'fp32'}"


def choose_precision(
    device: torch.device, key: Mapping[str, Any], measure: Callable[[str], tuple[float, int]]
) -> dict[str, Any]:
    """``precision: auto`` for one model on this device: ``{"precision", "candidate",
    "min_cosine", "rows", "device"}``. ``measure(candidate)`` embeds the probe rows in fp32 and in
    ``candidate`` and returns (min cosine, rows); it runs only when the cache has no answer."""
    candidate, name = native_reduced(device), device_name(device)
    if candidate is None:
        return {"precision": "fp32", "candidate": None, "min_cosine": None, "rows": 0, "device": name}

    def probe() -> dict[str, Any]:
        cosine, rows = measure(candidate)
        keep = rows >= MIN_ROWS and cosine >= MIN_COSINE
        return {
            "precision": candidate if keep else "fp32",
            "candidate": candidate,
            "min_cosine": round(cosine, 6),
            "rows": rows,
            "device": name,
        }

    parts = {**key, "candidate": candidate, "device": name, "torch": torch.__version__}
    parts.update(gate=MIN_COSINE, min_rows=MIN_ROWS)
    return cached_json(CACHE_FILE, parts, probe, keep=lambda report: report["rows"] >= MIN_ROWS)
