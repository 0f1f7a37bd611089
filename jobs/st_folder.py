"""The fine-tuned model as a sentence-transformers folder, which ``SentenceTransformer(DIR)``,
``AutoModel.from_pretrained(DIR)`` and omniembed (``model: DIR``) all load.

- The transformer is always saved at the folder's root (safetensors), with its tokenizer, so
  ``AutoModel`` finds it there; ``modules.json`` names it with path ``""``.
- A sentence-transformers base folder keeps its own files and modules (Pooling, Dense,
  Normalize, prompts, max_seq_length); modules with weights after Pooling are saved again
  from the tuned ones. Stale weights (the base's, ONNX or OpenVINO exports) are not copied.
- A plain Hugging Face base folder gets the modules the pipeline embedded it with:
  Transformer, Pooling (its pooling mode) and Normalize when it normalized, plus
  ``sentence_bert_config.json`` with the max length and lowercasing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from encoders.core.weights import WEIGHT_SUFFIXES
from encoders.text.tokenize import ST_POOLING_KEYS, read_folder_settings, read_json
from jobs.text_tower import TextTower

EXPORT_FOLDERS = ("onnx", "openvino")
ST = "sentence_transformers.models"
POOLING_KEYS = {mode: key for key, mode in ST_POOLING_KEYS.items()}  # what the folder reader understands


def write_folder(tower: TextTower, output: str, card: str) -> None:
    """Save ``tower`` (its tuned weights loaded) as a sentence-transformers folder at ``output``;
    ``card`` is the README.md written into it."""
    folder = read_folder_settings(tower.spec.path)
    root, out = Path(folder.root), Path(output)
    out.mkdir(parents=True, exist_ok=True)
    modules = read_json(root / "modules.json")
    if modules:
        _copy_without_weights(root, out)
        model_dir = Path(folder.model_dir)
        if model_dir != root:  # the transformer's own files (tokenizer, sentence_bert_config) go to the root
            for item in model_dir.iterdir():
                if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(item, out / item.name)
        for module in modules:  # the base's transformer sub-folder, if it had one: now at the root
            if module.get("type", "").endswith(".Transformer") and module.get("path"):
                shutil.rmtree(out / module["path"], ignore_errors=True)
        modules = [_transformer_at_root(m) for m in modules]
    else:
        modules = _modules_for_plain_folder(tower, out)
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    tower.model.save_pretrained(out, safe_serialization=True)
    tower.tokenizer.save_pretrained(out)
    if tower.head is not None:
        for module, path in zip(tower.head, tower.head_paths):
            if path and hasattr(module, "save"):
                module.save(str(out / path))
    (out / "README.md").write_text(card)


def _copy_without_weights(root: Path, out: Path) -> None:
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(WEIGHT_SUFFIXES) or (Path(folder) == root and n in EXPORT_FOLDERS)]

    shutil.copytree(root, out, ignore=ignore, dirs_exist_ok=True)


def _transformer_at_root(module: dict[str, Any]) -> dict[str, Any]:
    if module.get("type", "").endswith(".Transformer"):
        return {**module, "path": ""}
    return module


def _modules_for_plain_folder(tower: TextTower, out: Path) -> list[dict[str, Any]]:
    options = tower.spec.options
    pooling = {key: False for key in POOLING_KEYS.values()}
    pooling[POOLING_KEYS[options["pooling"]]] = True
    width = int(tower.model.config.hidden_size)
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": width, **pooling}, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": options["max_length"], "do_lower_case": bool(options["lowercase"])})
    )
    if options.get("prefix"):
        (out / "config_sentence_transformers.json").write_text(
            json.dumps({"prompts": {"default": options["prefix"]}, "default_prompt_name": "default"}, indent=2)
        )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": f"{ST}.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{ST}.Pooling"},
    ]
    if options["normalize"]:
        (out / "2_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": f"{ST}.Normalize"})
    return modules
