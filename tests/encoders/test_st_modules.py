"""sentence-transformers folders with modules after Pooling (Dense, LayerNorm, Normalize): the
vectors and D are sentence-transformers' own ``encode``, the reference, not our reading of it."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES
from pipeline.config import ConfigError, config_from_dict
from pipeline.plan import plan_encoders

st = pytest.importorskip("sentence_transformers", reason="pip install 'omniembed[st]'")
CPU = torch.device("cpu")


def build_folder(base: str, target, seed: int = 0, truncate_dim: int | None = None) -> str:
    """Transformer -> mean Pooling -> Dense 32->16 (tanh) -> LayerNorm(16) -> Normalize, saved by
    sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm, Normalize, Pooling, Transformer

    torch.manual_seed(seed)
    transformer = Transformer(base, max_seq_length=48)
    dense = Dense(32, 16, activation_function=torch.nn.Tanh())
    norm = LayerNorm(16)
    with torch.no_grad():  # a LayerNorm that is not the identity
        norm.norm.weight.uniform_(0.5, 1.5)
        norm.norm.bias.uniform_(-0.2, 0.2)
    modules = [transformer, Pooling(32, "mean"), dense, norm, Normalize()]
    model = SentenceTransformer(modules=modules, device="cpu", truncate_dim=truncate_dim)
    model.save(str(target))
    return str(target)


PLACES = {"sources": [{"path": "x", "id_column": "id"}], "output": {"path": "o"}}


def spec_of(folder: str, **options):
    encoder = {"output": "v", "column": "text", "model": folder, **options}
    return plan_encoders(config_from_dict({**PLACES, "encoders": [encoder]}).encoders)[0]


def embed(spec, texts):
    family = FAMILIES.get(spec.family)
    prepared = family.prepare(spec, "text", pa.array(texts))
    assert prepared.errors == [None] * len(texts)
    result = family.load(spec, CPU)("text", prepared.values)
    return result.vectors


@pytest.fixture(scope="module")
def st_dense(tiny_bert, tmp_path_factory):
    return build_folder(tiny_bert, tmp_path_factory.mktemp("st-dense") / "model")


def test_dense_layernorm_head_equals_sentence_transformers(st_dense, real_texts):
    from sentence_transformers import SentenceTransformer

    spec = spec_of(st_dense)
    assert spec.dim == 16  # Dense's out_features, not the transformer's 32
    assert spec.options["modules"] == ["Dense", "LayerNorm", "Normalize"] and spec.options["normalize"] is True
    texts = real_texts[:40]
    ours = embed(spec, texts)
    reference = SentenceTransformer(st_dense, device="cpu").encode(texts, convert_to_numpy=True, batch_size=7)
    assert ours.shape == reference.shape == (40, 16)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_dim_of_the_head_without_loading_the_transformer(st_dense, tmp_path, monkeypatch):
    from transformers import AutoModel

    monkeypatch.setenv("OMNIEMBED_CACHE", str(tmp_path))
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("weights were read to probe D"))
    assert spec_of(st_dense).dim == 16


def test_head_weights_are_in_the_weights_hash(st_dense, tmp_path):
    """A changed Dense gives other vectors: the output's fingerprint must change with it."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(st_dense, other)
    dense = next(other.glob("*Dense*"))
    weights = load_file(dense / "model.safetensors")
    weights = {k: v + 0.01 for k, v in weights.items()}
    save_file(weights, dense / "model.safetensors")
    assert spec_of(str(other)).weights_sha256 != spec_of(st_dense).weights_sha256


def test_module_before_pooling_is_refused_in_one_line(st_dense, tmp_path):
    folder = tmp_path / "before"
    shutil.copytree(st_dense, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(1, modules.pop(2))  # Dense between the transformer and the pooling
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError) as info:
        spec_of(str(folder))
    message = str(info.value)
    assert "\n" not in message and message.startswith("encoders[0]") and "before Pooling" in message


def test_a_module_class_outside_sentence_transformers_needs_trust(st_dense, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(st_dense, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[2]["type"] = "os.system"  # code chosen by the folder: never imported without trust
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError) as info:
        spec_of(str(folder))
    message = str(info.value)
    assert "\n" not in message and "os.system" in message and "trust_remote_code" in message


def test_without_sentence_transformers_the_folder_is_one_line_naming_the_package(st_dense, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers.util", None)
    with pytest.raises(ConfigError) as info:
        spec_of(st_dense)
    message = str(info.value)
    assert "\n" not in message and "sentence-transformers" in message and "omniembed[st]" in message


def test_dimensions_keep_the_first_values_renormalized(tiny_bert, real_texts, tmp_path):
    """A Matryoshka-declared folder (truncate_dim 8 in config_sentence_transformers.json): the
    output keeps 8 values, renormalized, as sentence-transformers' encode with
    normalize_embeddings; dimensions: N overrides the declaration, and past D is refused."""
    import pyarrow as pa
    from sentence_transformers import SentenceTransformer

    from pipeline.columns import embedding_column
    from pipeline.stages import EncodeActor, prepare_batch

    folder = build_folder(tiny_bert, tmp_path / "matryoshka", truncate_dim=8)
    spec = spec_of(folder)
    assert (spec.dim, spec.options["dimensions"], spec.options["model_dim"]) == (8, 8, 16)
    texts = real_texts[:24]
    batch = pa.table({"id": [str(i) for i in range(24)], "text": texts})
    out = EncodeActor(spec, threads=1, max_tokens=8192)(prepare_batch(batch, spec))
    ours = np.array(out.column(embedding_column(spec, "text")).to_pylist(), np.float32)
    reference = SentenceTransformer(folder, device="cpu").encode(texts, normalize_embeddings=True)
    assert ours.shape == reference.shape == (24, 8)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)

    config = {**PLACES, "encoders": [{"output": "v", "column": "text", "model": folder, "dimensions": 4}]}
    assert plan_encoders(config_from_dict(config).encoders)[0].dim == 4
    config["encoders"][0]["dimensions"] = 17
    with pytest.raises(ConfigError, match=r"encoders\[0\]\.dimensions: 17 is more than the model's 16 values"):
        plan_encoders(config_from_dict(config).encoders)
