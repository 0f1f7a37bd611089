"""ONNX Runtime for hf-text's transformer (``backend: onnx``), optionally with int8 weights.

Only the transformer's forward moves: the hidden states come back as a torch tensor, and
pooling, the folder's modules after Pooling, chunking and normalization stay hf-text's own code.

- **Export.** torch's TorchScript exporter (``dynamo=False``: it needs only ``onnx``; the dynamo
  exporter needs onnxscript too), once per node, into ``<cache>/onnx/<key>/model.onnx``, where
  the cache is ``$OMNIEMBED_CACHE`` or ``~/.cache/omniembed`` and the key is the weights sha256,
  the opset, torch's version and ``quantize``. A temporary folder is renamed into place, so two
  actors exporting at once never see half a file.
- **The attention mask is an input.** The trace runs eager attention on a batch with padding:
  transformers drops an all-ones mask on some paths, and a trace of that path would bake
  "no padding" into the graph. Batch and sequence axes are symbolic, and every export is checked
  against torch on a batch of another shape, with padding, before it is published.
- **int8** (``quantize: int8``, never the default): ``quantize_dynamic`` of the fp32 export,
  int8 weights per output channel for MatMul (per tensor drops MiniLM's min cosine to fp32 from
  0.987 to 0.90; the embedding tables stay fp32). Its recall must pass benchmarks/onnx_quality.py
  (recall@10 within 0.01 of fp32) on the model at hand: CPUs without VNNI saturate sooner.
- **Precision.** ORT on a CPU has no bf16 autocast, so this backend always runs fp32 (int8
  weights under ``quantize: int8``): ``check_backend`` pins the ``precision`` option to ``fp32``
  whatever was asked, and the metadata says so. It runs on the CPU; on a GPU actor the hidden
  states move to the GPU for pooling (use ``backend: torch`` there).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, MutableMapping

import torch

from encoders.core.probe import cache_path
from encoders.core.registry import MissingDependencyError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
QUANTIZE_MODES = ("none", "int8")
OPSET = 17
EXPORT_ATOL = 1e-3  # the export's own check against torch; the tests hold it to 1e-4 on real text


def check_backend(opts: MutableMapping[str, Any]) -> None:
    """``backend`` and ``quantize`` checked (one line each) and, for onnx, ``precision`` pinned to fp32."""
    if opts["backend"] not in BACKENDS:
        raise ValueError(f"backend {opts['backend']!r} is not valid; valid values: {', '.join(BACKENDS)}")
    if opts["quantize"] not in QUANTIZE_MODES:
        raise ValueError(f"quantize {opts['quantize']!r} is not valid; valid values: {', '.join(QUANTIZE_MODES)}")
    if opts["quantize"] != "none" and opts["backend"] != "onnx":
        raise ValueError(f"quantize {opts['quantize']!r} needs backend: onnx (backend is {opts['backend']!r})")
    if opts["backend"] != "onnx":
        return
    if any(importlib.util.find_spec(name) is None for name in ("onnxruntime", "onnx")):
        raise MissingDependencyError("backend: onnx needs the 'onnx' extra: pip install 'omniembed[onnx]'")
    if opts["precision"] not in ("auto", "fp32"):
        log.warning("backend: onnx runs fp32 in ONNX Runtime; precision %s is not used", opts["precision"])
    opts["precision"] = "fp32"


@dataclass
class OnnxOutput:
    last_hidden_state: torch.Tensor  # (n, t, d) float32


class OnnxTransformer:
    """An ONNX Runtime session called like the torch model: ``model(**inputs).last_hidden_state``."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the actor set its threads before loading
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs: torch.Tensor) -> OnnxOutput:
        feed = {name: inputs[name].cpu().numpy() for name in self.input_names}
        (hidden,) = self.session.run(["last_hidden_state"], feed)
        return OnnxOutput(torch.from_numpy(hidden).to(inputs["input_ids"].device))


def load_onnx_transformer(model_dir: str, sha: str, quantize: str, token_types: bool, trust: bool) -> OnnxTransformer:
    return OnnxTransformer(onnx_model(model_dir, sha, quantize, token_types, trust))


def onnx_model(model_dir: str, sha: str, quantize: str, token_types: bool, trust: bool) -> Path:
    """The cached ONNX file for these weights and ``quantize``, exported (and quantized) if missing."""
    fp32 = _published(_export_dir(sha, "none"), lambda dest: export(model_dir, dest, token_types, trust))
    if quantize == "none":
        return fp32
    return _published(_export_dir(sha, quantize), lambda dest: quantize_int8(fp32, dest))


def _export_dir(sha: str, quantize: str) -> Path:
    key = f"{sha}-opset{OPSET}-torch{torch.__version__}-{quantize}"
    if quantize != "none":  # the quantizer's own version decides the int8 weights
        import onnxruntime

        key += f"-ort{onnxruntime.__version__}"
    return cache_path("onnx") / key


def _published(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder/model.onnx``, built into a temporary folder and renamed into place if missing."""
    target = folder / "model.onnx"
    if target.is_file():
        return target
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(staging / "model.onnx")
        try:
            os.rename(staging, folder)
        except OSError:
            if not target.is_file():  # another actor did not publish it first: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _dummy_inputs(names: list[str], vocab_size: int, n: int, t: int) -> tuple[torch.Tensor, ...]:
    """(n, t) int64 ids, a mask whose last row is padded after 3 tokens, zero token types."""
    ids = (torch.arange(n * t, dtype=torch.long).reshape(n, t) * 7 + 5) % max(vocab_size, 1)
    mask = torch.ones((n, t), dtype=torch.long)
    mask[-1, 3:] = 0
    by_name = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return tuple(by_name[name] for name in names)


class _LastHidden(torch.nn.Module):
    """The transformer with positional inputs and one output, as the exporter traces it."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def export(model_dir: str, dest: Path, token_types: bool, trust: bool) -> None:
    """The folder's transformer -> ``dest`` (fp32 ONNX), checked against torch on another shape."""
    import numpy as np
    from transformers import AutoModel

    log.info("exporting %s to ONNX (opset %d): once per node", model_dir, OPSET)
    model = AutoModel.from_pretrained(
        model_dir, trust_remote_code=trust, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    wrapper = _LastHidden(model, names)
    check = _dummy_inputs(names, vocab, 3, 11)
    with torch.inference_mode():
        expected = wrapper(*check).numpy()  # before the export: the trace may leave the module changed
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
    with torch.no_grad(), warnings.catch_warnings():
        # The trace's warnings are about Python branches on shapes; the check below tests the graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's own notice
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)  # mask indices are >= 0
        torch.onnx.export(
            wrapper,
            _dummy_inputs(names, vocab, 2, 8),
            str(dest),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
        )
    runner = OnnxTransformer(dest)
    got = runner(**dict(zip(names, check))).last_hidden_state.numpy()
    valid = check[names.index("attention_mask")].numpy().astype(bool)
    diff = float(np.abs(got - expected)[valid].max())
    if diff > EXPORT_ATOL:
        raise RuntimeError(f"the ONNX export of {model_dir} differs from torch by {diff:.2e} on a padded batch")


def quantize_int8(src: Path, dest: Path) -> None:
    """Dynamic int8: MatMul weights per output channel, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantizing %s to int8", src)
    quantize_dynamic(
        str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
