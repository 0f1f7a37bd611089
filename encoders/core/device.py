"""Device and precision choice for an encoder inside its actor."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Mapping

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class DeviceModel:
    """Where every model half starts: its spec's options, its device, and the precision resolved
    for that device. Families' encoders subclass it and load their model after ``__init__``."""

    def __init__(self, spec: Any, device: torch.device) -> None:
        self.options: Mapping[str, Any] = spec.options
        self.device = device
        self.precision = resolve_precision(device, spec.options["precision"])


def pick_device(prefer_gpu: bool = True) -> torch.device:
    """CUDA when this process was given a GPU, else CPU."""
    if prefer_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` in one process: fp16/bf16 on a GPU, fp32 on a CPU. A run resolves ``auto`` once,
    with a fidelity probe (pipeline/precision.py), and pins the result before any actor starts."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not valid; valid values: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return native_reduced(device) if device.type == "cuda" else "fp32"  # type: ignore[return-value]


def native_reduced(device: torch.device) -> str | None:
    """The reduced precision ``device`` computes natively, or None. A GPU: bf16 where native,
    else fp16 (emulated bf16 on a T4 or V100 is slower than fp16). A CPU: bf16 with AVX512-BF16
    or AMX; ``get_cpu_capability()`` says ``AVX512`` without them too, so it cannot tell."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return "bf16" if any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks) else None
    return None


def check_runtime_options(opts: Mapping[str, Any]) -> None:
    """The options every family shares: ``precision`` a known name, ``micro_batch`` >= 1 where set."""
    resolve_precision(torch.device("cpu"), opts["precision"])
    if opts.get("micro_batch") is not None and opts["micro_batch"] < 1:
        raise ValueError(f"option micro_batch: must be >= 1, got {opts['micro_batch']}")


def autocast(device: torch.device, precision: str) -> ContextManager[object]:
    """fp16/bf16 autocast for the forward pass; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def planned_precision(device_type: str, precision: str) -> str:
    """The precision an actor on ``device_type`` will use, known before it starts. On CUDA,
    ``auto`` is bf16 where the GPU supports it and fp16 otherwise, decided in the actor."""
    if precision != "auto":
        return precision
    return "fp32" if device_type == "cpu" else "auto:bf16|fp16"
