"""jobs.finetune: the cached loss's gradient is the full batch's, early stopping keeps the best
epoch, a tiny model trains on a loopback Ray with its loss going down, the output folder embeds
the same through sentence-transformers, AutoModel and omniembed, and bad inputs are one line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import own_stderr

st = pytest.importorskip("sentence_transformers", reason="pip install 'omniembed[st]'")
ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "examples" / "data" / "docstring_pairs.jsonl"
CPU = torch.device("cpu")


def tower_spec(folder: str, **flags):
    from jobs.finetune import resolve_model

    args = {"model": folder, "max_length": None, "trust_remote_code": False, **flags}
    return resolve_model(argparse.Namespace(**args))


def real_pairs(n: int) -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines()[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def omniembed_vectors(folder: str, texts: list[str]) -> np.ndarray:
    from encoders import FAMILIES
    from jobs.query_encoding import QueryEncoder
    from pipeline.config import EncoderConfig
    from pipeline.plan import plan_encoder

    spec = plan_encoder(EncoderConfig("v", folder, {"*": "text"}, None, {"precision": "fp32"}), "model")
    return QueryEncoder(spec, FAMILIES.get(spec.family).load(spec, CPU)).encode("text", texts)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def test_cached_loss_gives_the_full_batch_gradient(tiny_st):
    """GradCache in mini-batches of 5 texts against one forward of all 36 (dropout off, so the
    two are the same function)."""
    from jobs.text_tower import TextTower, cached_mnrl_step

    pairs = real_pairs(12)
    tower = TextTower(tower_spec(tiny_st), dropout=0.0).train()
    columns = [tower.tokenize([p[c] for p in pairs]) for c in ("anchor", "positive")]
    columns.append(list(reversed(columns[1])))  # hard negatives: other pairs' positives
    grads, losses = [], []
    for mini_batch in (1000, 5):
        tower.zero_grad()
        losses.append(cached_mnrl_step(tower, columns, mini_batch))
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in grads[0].values())


def test_early_stopping_keeps_the_best_epochs_weights(tiny_st, monkeypatch):
    """Validation MRR scripted 0.5 (base), 0.6, 0.9, 0.7, 0.65: patience 2 stops after epoch 4,
    and the payload holds the weights as they were when epoch 2 was scored."""
    import jobs.finetune_loop as loop
    from jobs.text_tower import Retrieval, embed_all

    scripted = iter([0.5, 0.6, 0.9, 0.7, 0.65, 0.6, 0.6])
    snapshots: list[dict[str, torch.Tensor]] = []

    def record(tower, sequences, **kw):
        snapshots.append({k: v.detach().clone() for k, v in tower.state_dict().items()})
        return embed_all(tower, sequences, **kw)

    monkeypatch.setattr(loop, "embed_all", record)
    monkeypatch.setattr(loop, "retrieval_metrics", lambda a, p: Retrieval(0.0, 0.0, next(scripted)))
    pairs = real_pairs(40)
    data = {
        "train": {c: [p[c] for p in pairs[:32]] for c in ("anchor", "positive")},
        "val": {c: [p[c] for p in pairs[32:]] for c in ("anchor", "positive")},
    }
    config = _config(tower_spec(tiny_st), epochs=7, patience=2, lr=1e-3)
    metrics, payload = loop.train(config, data, CPU)
    assert metrics["best_epoch"] == 2 and metrics["epochs_run"] == 4
    assert [h["epoch"] for h in payload["history"]] == [0, 1, 2, 3, 4]
    at_epoch = snapshots[::2]  # two embed_all calls (anchors, positives) per validation
    for name, value in payload["state"].items():
        torch.testing.assert_close(value, at_epoch[2][name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(payload["state"][n], at_epoch[4][n]) for n in payload["state"])


def _config(spec, **overrides):
    config = {
        "spec": spec,
        "lr": 5e-4,
        "weight_decay": 0.01,
        "warmup_ratio": 0.1,
        "dropout": None,
        "epochs": 3,
        "patience": 3,
        "batch_size": 8,
        "mini_batch_size": 6,
        "seed": 0,
        "precision": "auto",
        "progress_seconds": 30,
    }
    return {**config, **overrides}


@pytest.fixture(scope="module")
def tuned(tiny_st, ray_session, tmp_path_factory):
    """A tiny sentence-transformers model trained 3 epochs on 120 real docstring pairs through
    the command line (with hard negatives), by two DDP workers on the session's Ray."""
    from jobs.finetune import main

    folder = tmp_path_factory.mktemp("finetune")
    rows = real_pairs(121)  # hard negatives: the next pair's positive
    pairs = write_jsonl(
        folder / "pairs.jsonl",
        [{"q": a["anchor"], "d": a["positive"], "n": b["positive"]} for a, b in zip(rows, rows[1:])],
    )
    output = folder / "tuned"
    argv = ["--pairs", pairs, "--anchor-column", "q", "--positive-column", "d", "--model", tiny_st]
    argv += ["--output", str(output), "--epochs", "3", "--lr", "1e-3", "--batch-size", "16", "--patience", "3"]
    argv += ["--workers", "2", "--cpus-per-worker", "0.5", "--mini-batch-size", "12", "--negative-column", "n"]
    assert main(argv) == 0
    return output


def test_tiny_model_trains_on_ray_with_the_loss_going_down(tuned, tiny_st):
    report = json.loads((tuned / "metrics.json").read_text())
    losses = [h["train_loss"] for h in report["history"][1:]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert report["pairs"] == {"train": 108, "validation": 12, "dropped": 0}
    assert report["settings"]["workers"] == 2
    assert set(report["base"]) == set(report["tuned"]) == {"recall@1", "recall@10", "mrr"}
    assert report["history"][0]["epoch"] == 0 and report["base"]["mrr"] == report["history"][0]["mrr"]
    best = report["history"][report["best_epoch"]]
    assert report["tuned"]["mrr"] == best["mrr"] == max(h["mrr"] for h in report["history"])
    assert report["weights_sha256"]["base"] == tower_spec(tiny_st).weights_sha256
    assert report["weights_sha256"]["tuned"] != report["weights_sha256"]["base"]  # a resume cannot mix them
    assert (tuned / "validation_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuned_folder_embeds_the_same_everywhere(tuned):
    """sentence-transformers is the reference; omniembed and AutoModel (+ the folder's CLS
    pooling, prompt and Normalize, applied by hand) agree with it at fp32."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    texts = [p["positive"] for p in real_pairs(150)[120:]]
    reference = SentenceTransformer(str(tuned), device="cpu").encode(texts, convert_to_numpy=True, batch_size=8)
    ours = omniembed_vectors(str(tuned), texts)
    assert ours.shape == reference.shape == (30, 32)
    assert cosine(ours, reference).min() >= 0.9999
    model, tokenizer = AutoModel.from_pretrained(str(tuned)).eval(), AutoTokenizer.from_pretrained(str(tuned))
    with torch.no_grad():
        batch = tokenizer(
            ["query: " + t for t in texts], padding=True, truncation=True, max_length=48, return_tensors="pt"
        )
        cls = model(**batch).last_hidden_state[:, 0].numpy()
    assert cosine(cls, reference).min() >= 0.9999


def test_written_folder_keeps_a_tuned_dense_head(tiny_bert, tmp_path):
    """A folder with Dense and LayerNorm after Pooling: the tuned head's weights are saved, and
    sentence-transformers, omniembed and the trained tower give the same vectors."""
    from sentence_transformers import SentenceTransformer

    from jobs.st_folder import write_folder
    from jobs.text_tower import TextTower, embed_all
    from tests.encoders.test_st_modules import build_folder

    base = build_folder(tiny_bert, tmp_path / "base")
    tower = TextTower(tower_spec(base))
    with torch.no_grad():  # stand-in for training: every weight moves
        for param in tower.parameters():
            param.add_(0.05 * torch.randn_like(param))
    write_folder(tower, str(tmp_path / "tuned"), "# card\n")
    texts = [p["anchor"] for p in real_pairs(20)]
    reference = SentenceTransformer(str(tmp_path / "tuned"), device="cpu").encode(texts, convert_to_numpy=True)
    original = SentenceTransformer(base, device="cpu").encode(texts, convert_to_numpy=True)
    trained = embed_all(tower, tower.tokenize(texts)).numpy()
    assert reference.shape == (20, 16)
    assert cosine(reference, trained).min() >= 0.9999
    assert cosine(omniembed_vectors(str(tmp_path / "tuned"), texts), reference).min() >= 0.9999
    assert cosine(original, reference).min() < 0.999  # the tuned head, not the base's, was saved


def test_plain_hugging_face_folder_becomes_a_sentence_transformers_folder(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    from jobs.st_folder import write_folder
    from jobs.text_tower import TextTower

    write_folder(TextTower(tower_spec(tiny_bert)), str(tmp_path / "out"), "# card\n")
    modules = json.loads((tmp_path / "out" / "modules.json").read_text())
    assert [m["type"].rpartition(".")[2] for m in modules] == [
        "Transformer",
        "Pooling",
    ]  # tiny_bert: mean, unnormalized
    texts = [p["positive"] for p in real_pairs(10)]
    reference = SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(texts, convert_to_numpy=True)
    base = omniembed_vectors(tiny_bert, texts)  # the pipeline's vectors of the plain folder
    np.testing.assert_allclose(omniembed_vectors(str(tmp_path / "out"), texts), reference, atol=1e-5)
    np.testing.assert_allclose(base, reference, atol=1e-5)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_column", "--pairs: column 'query' is not in"),
        ("empty_file", "--pairs: cannot read 'empty.jsonl' as jsonl: Empty JSON file"),
        ("no_rows", "--pairs: no usable pairs in"),
        ("blank_cells", "all 3 rows have an empty or non-text cell"),
        ("no_model", "--model: model path"),
        ("image_model", "jobs.finetune trains text encoders"),
        ("batch_size", "--batch-size: must be >= 2"),
        ("output_exists", "--output: "),
    ],
)
def test_bad_inputs_are_one_line_with_exit_2(case, expected, tiny_st, tmp_path, capsys, monkeypatch):
    from jobs.finetune import main

    monkeypatch.setattr("jobs.finetune.start_ray", lambda address: pytest.fail("Ray started for a user error"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", real_pairs(20))
    argv = {"--pairs": pairs, "--model": tiny_st, "--output": str(tmp_path / "out")}
    extra: list[str] = []
    if case == "missing_column":
        extra = ["--anchor-column", "query"]
    elif case == "empty_file":
        argv["--pairs"] = write_jsonl(tmp_path / "empty.jsonl", [])
    elif case == "no_rows":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"anchor": pa.array([], pa.string()), "positive": pa.array([], pa.string())}),
            tmp_path / "0.parquet",
        )
        argv["--pairs"] = str(tmp_path / "0.parquet")
    elif case == "blank_cells":
        rows = [{"anchor": " ", "positive": "x"}, {"anchor": "a", "positive": None}, {"anchor": "", "positive": "y"}]
        argv["--pairs"] = write_jsonl(tmp_path / "blank.jsonl", rows)
    elif case == "no_model":
        argv["--model"] = str(tmp_path / "nowhere")
    elif case == "image_model":
        argv["--model"] = _tiny_vit(tmp_path / "vit")
    elif case == "batch_size":
        extra = ["--batch-size", "1"]
    elif case == "output_exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main([x for kv in argv.items() for x in kv] + extra) == 2
    lines = own_stderr(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("jobs.finetune: error: ") and expected in lines[0], lines


def _tiny_vit(folder: Path) -> str:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    from transformers.utils import logging as hf_logging

    from tests.conftest import TINY_LAYERS

    hf_logging.disable_progress_bar()  # its bar would be on the stderr the test reads
    ViTModel(ViTConfig(**TINY_LAYERS, image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_example_pairs_and_loop_configs():
    """The shipped pairs: enough for a held-out split of a few hundred, no repeated anchor or
    positive (an in-batch negative is never a true positive); the loop's configs load."""
    from pipeline.config import load_config

    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert len(rows) >= 2400 and all(set(r) == {"anchor", "positive", "source"} for r in rows)
    for field in ("anchor", "positive", "source"):
        assert len({r[field].casefold() for r in rows}) == len(rows), field
    base, tuned = (load_config(ROOT / "examples" / "finetune" / f"{name}.yaml") for name in ("base", "tuned"))
    assert base.sources == tuned.sources and base.output.path != tuned.output.path
    assert tuned.encoders[0].model == "examples/out/minilm-docstrings"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_steps_train(precision, tiny_bert, monkeypatch):
    """The GPU's mixed-precision paths, run on the CPU: fp16 autocast with a gradient scaler
    (the cached gradients scaled, then unscaled before clipping) and bf16 autocast both lower
    the training pairs' loss (measured in fp32, without dropout); the weights stay float32."""
    import jobs.finetune_loop as loop
    from jobs.text_tower import Retrieval, TextTower, embed_all, mnrl_loss

    pairs = real_pairs(72)
    data = {
        "train": {c: [p[c] for p in pairs[:64]] for c in ("anchor", "positive")},
        "val": {c: [p[c] for p in pairs[64:]] for c in ("anchor", "positive")},
    }
    autocast, scaler = loop.amp_for(CPU, precision)
    assert autocast is not None and (scaler is not None) == (precision == "fp16")
    spec = tower_spec(tiny_bert)  # mean pooling: the tiny CLS model's vectors start nearly all alike
    scores = iter([0.1, 0.2, 0.3, 0.4])  # each epoch "better": the payload is the last epoch's weights
    monkeypatch.setattr(loop, "retrieval_metrics", lambda a, p: Retrieval(0.0, 0.0, next(scores)))
    torch.manual_seed(0)  # dropout draws from the global generator: the same masks whatever ran before
    _, payload = loop.train(_config(spec, epochs=3, lr=1e-3, precision=precision, mini_batch_size=12), data, CPU)
    assert payload["best_epoch"] == 3
    assert all(v.dtype == torch.float32 for v in payload["state"].values() if v.is_floating_point())
    assert np.all(np.isfinite([h["train_loss"] for h in payload["history"][1:]]))

    tower = TextTower(spec)
    ids = [tower.tokenize(data["train"][c]) for c in ("anchor", "positive")]

    def loss() -> float:
        return float(mnrl_loss(*(embed_all(tower, s) for s in ids)))

    before = loss()
    tower.load_state_dict(payload["state"])
    assert loss() < 0.9 * before
