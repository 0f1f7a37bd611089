"""hf-text: vectors equal sentence-transformers / a direct AutoModel forward, whatever the batching.

References are computed outside omniembed (sentence-transformers' ``encode``, or ``AutoModel``
plus pooling by hand); models load once per module.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES, resolve_weights
from encoders.core.errors import ERROR_CODES, error_code
from encoders.core.pooling import POOLING_MODES
from encoders.core.spec import EncoderSpec, SpecRequest
from encoders.core.weights import ResolvedWeights
from encoders.text.hf_text import LONG_TEXT_MODES, TEXT_OPTIONS
from encoders.text.tokenize import read_folder_settings

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
FAMILY = FAMILIES.get("hf-text")
CPU = torch.device("cpu")
ATOL = 1e-5

MULTILINGUAL = [
    "I love 🍕 and 🎉 on Fridays! 👩‍👩‍👧‍👦",
    "🙂",
    "東京は日本の首都です。人口は約1400万人です。",
    "北京欢迎你，今天天气很好。",
    "한국어 문장도 포함됩니다.",
    "שלום עולם, מה שלומך היום?",
    "مرحبا بالعالم، كيف حالك؟",
    "Mixed עברית and English with 中文 and العربية in one line.",
    "Ünïcödé façade, naïve café, Straße, Ærøskøbing.",
    "\u200fRTL mark and zero\u200bwidth space",
]


def make_spec(weights, options=None, dim=None):
    return FAMILY.build_spec(SpecRequest("out", {"text": "c"}, weights, options or {}, dim))


def embed(spec, encoder, values, max_tokens=8192):
    """values -> (vectors, valid, prepared), through the family's own prepare and encoder."""
    prepared = FAMILY.prepare(spec, "text", pa.array(values))
    result = encoder("text", prepared.values, max_tokens=max_tokens)
    vectors, valid = result.vectors, result.valid
    assert vectors.dtype == np.float32 and vectors.shape == (len(values), encoder.dim)
    assert valid.dtype == bool and valid.shape == (len(values),)
    return vectors, valid, prepared


def assert_rows_close(actual, expected, cosine=0.9999, atol=ATOL):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    cos = (actual * expected).sum(1) / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))
    assert cos.min() >= cosine, f"row {cos.argmin()}: cosine {cos.min():.6f}"
    diff = np.abs(actual - expected).max()
    assert diff <= atol, f"max abs diff {diff:.2e}"


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Module-scoped models: each loads once.


@pytest.fixture(scope="module")
def minilm(minilm_path):
    weights = resolve_weights(MINILM_ID)
    assert weights.source == "bundled"
    spec = make_spec(weights, dim=384)
    return weights, spec, FAMILY.load(spec, CPU)


@pytest.fixture(scope="module")
def minilm_st(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


CHUNK_OPTIONS = {"long_text": "chunk", "max_length": 64, "chunk_overlap": 16, "max_chunks": 4}


@pytest.fixture(scope="module")
def minilm_chunk(minilm):
    weights, _, _ = minilm
    spec = make_spec(weights, CHUNK_OPTIONS, dim=384)
    return spec, FAMILY.load(spec, CPU)


@pytest.fixture(scope="module")
def minilm_lengths(minilm_st, real_texts):
    return [len(ids) for ids in minilm_st.tokenizer(real_texts, verbose=False)["input_ids"]]


@pytest.fixture(scope="module")
def fidelity_texts(real_texts, minilm_lengths):
    """100 real paragraphs: 90 spread over 5..128 tokens, and 10 longer than 256 tokens."""
    long = [t for t, n in zip(real_texts, minilm_lengths) if n > 256][:10]
    short = sorted((n, t) for t, n in zip(real_texts, minilm_lengths) if n <= 128)
    step = len(short) / 90
    picked = [short[int(i * step)][1] for i in range(90)]
    texts = picked + long
    random.Random(0).shuffle(texts)  # mixed lengths in input order
    assert len(texts) == 100 and len(long) == 10
    return texts


@pytest.fixture(scope="module")
def fidelity_vectors(minilm, fidelity_texts):
    _, spec, encoder = minilm
    vectors, valid, _ = embed(spec, encoder, fidelity_texts)
    assert valid.all()
    return vectors


@pytest.fixture(scope="module")
def tiny_bert_weights(tiny_bert):
    return resolve_weights(tiny_bert)


@pytest.fixture(scope="module")
def tiny_bert_default(tiny_bert_weights):
    spec = make_spec(tiny_bert_weights, dim=32)
    return spec, FAMILY.load(spec, CPU)


@pytest.fixture(scope="module")
def tiny_bert_reference(tiny_bert):
    """The plain folder loaded with transformers alone: the reference computation."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert).eval()


def _with_working_vocab(folder: str, dest: Path) -> str:
    """A copy of a tiny folder whose tokenizer really uses vocab.txt. (The shared fixtures build
    theirs with ``BertTokenizerFast(vocab_file=...)``, which transformers 5 ignores: every word
    becomes [UNK], so prompts 'query: ' and 'passage: ' tokenize alike.)"""
    from transformers import BertTokenizerFast

    shutil.copytree(folder, dest)
    tokenizer = BertTokenizerFast(vocab=str(dest / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(dest)
    assert tokenizer.unk_token_id not in tokenizer("query passage")["input_ids"]
    return str(dest)


@dataclass
class STFolder:
    kind: str
    weights: ResolvedWeights
    spec: EncoderSpec
    encoder: object
    st: object


@pytest.fixture(scope="module", params=["as-given", "working-vocab"])
def st_folder(request, tiny_st, tmp_path_factory) -> STFolder:
    """tiny_st as the shared fixture builds it, and the same folder with a working vocabulary."""
    from sentence_transformers import SentenceTransformer

    folder = (
        tiny_st
        if request.param == "as-given"
        else _with_working_vocab(tiny_st, tmp_path_factory.mktemp("st-vocab") / "tiny-st")
    )
    weights = resolve_weights(folder)
    spec = make_spec(weights, dim=32)
    return STFolder(request.param, weights, spec, FAMILY.load(spec, CPU), SentenceTransformer(folder, device="cpu"))


@pytest.fixture(scope="module")
def tiny_texts(real_texts):
    """Real paragraphs cut to 1..120 words: some fit in 48 tokens, some pass 128."""
    rng = random.Random(1)
    return [" ".join(t.split()[: rng.randint(1, 120)]) for t in real_texts[:24]]


# ---------------------------------------------------------------------------------------------
# Fidelity with real weights


def test_minilm_matches_sentence_transformers_on_real_text(fidelity_texts, fidelity_vectors, minilm_st):
    lengths = [len(ids) for ids in minilm_st.tokenizer(fidelity_texts, verbose=False)["input_ids"]]
    assert sum(n > 256 for n in lengths) >= 10 and min(lengths) < 16
    expected = minilm_st.encode(fidelity_texts, convert_to_numpy=True)
    assert_rows_close(fidelity_vectors, expected)
    np.testing.assert_allclose(np.linalg.norm(fidelity_vectors, axis=1), 1.0, atol=1e-5)


def test_minilm_matches_sentence_transformers_on_emoji_cjk_rtl(minilm, minilm_st):
    _, spec, encoder = minilm
    vectors, valid, _ = embed(spec, encoder, MULTILINGUAL)
    assert valid.all()
    assert_rows_close(vectors, minilm_st.encode(MULTILINGUAL, convert_to_numpy=True))


def test_minilm_tokens_equal_sentence_transformers_tokens(minilm, minilm_st, fidelity_texts):
    _, spec, _ = minilm
    prepared = FAMILY.prepare(spec, "text", pa.array(fidelity_texts))
    expected = minilm_st.tokenize(fidelity_texts)
    for row, (chunks, mask) in enumerate(zip(prepared.values.to_pylist(), expected["attention_mask"])):
        assert len(chunks) == 1
        n = int(mask.sum())
        assert chunks[0] == expected["input_ids"][row][:n].tolist()
        assert len(chunks[0]) <= 256


def test_minilm_spec_follows_the_folder_not_the_tokenizer(minilm):
    _, spec, encoder = minilm
    assert spec.options["max_length"] == 256  # sentence_bert_config.json, not the tokenizer's 512
    assert spec.options["pooling"] == "mean"
    assert spec.options["normalize"] is True
    assert spec.options["prefix"] == ""
    assert spec.dim == encoder.dim == 384
    assert encoder.precision == "fp32"


def test_spec_is_picklable_and_its_metadata_has_no_local_path(minilm, tiny_bert_default, tiny_bert):
    _, spec, _ = minilm
    clone = pickle.loads(pickle.dumps(spec))
    assert clone == spec
    meta = spec.metadata("cpu", "fp32")
    assert meta["model"] == MINILM_ID and meta["dim"] == 384 and meta["max_length"] == 256
    assert re.fullmatch(r"[0-9a-f]{64}", meta["weights_sha256"])
    tiny_meta = tiny_bert_default[0].metadata("cpu", "fp32")
    assert tiny_meta["model"] == f"local:{Path(tiny_bert).name}"
    assert str(Path(tiny_bert).parent) not in json.dumps(tiny_meta)
    assert spec.weights.path not in json.dumps(meta)


# ---------------------------------------------------------------------------------------------
# Invariance: batching and order do not change vectors


@pytest.fixture(scope="module")
def invariance_rows(fidelity_texts, minilm_st):
    """32 rows of the fidelity set, including every long one."""
    lengths = [len(ids) for ids in minilm_st.tokenizer(fidelity_texts, verbose=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > 256][:4]
    rest = [i for i in range(len(fidelity_texts)) if i not in long][:28]
    rows = sorted(long + rest)
    assert len(rows) == 32 and len(long) == 4
    return rows


@pytest.mark.parametrize("max_tokens", [64, 512, 8192, 100_000])
def test_vectors_do_not_depend_on_max_tokens(minilm, fidelity_texts, fidelity_vectors, invariance_rows, max_tokens):
    _, spec, encoder = minilm
    texts = [fidelity_texts[i] for i in invariance_rows]
    vectors, valid, _ = embed(spec, encoder, texts, max_tokens=max_tokens)
    assert valid.all()
    # The reference ran all 100 rows at max_tokens=8192: other batch mates, other padding.
    assert np.abs(vectors - fidelity_vectors[invariance_rows]).max() <= ATOL


def test_vectors_do_not_depend_on_row_order(minilm, fidelity_texts, fidelity_vectors, invariance_rows):
    _, spec, encoder = minilm
    order = list(invariance_rows)
    random.Random(7).shuffle(order)
    vectors, _, _ = embed(spec, encoder, [fidelity_texts[i] for i in order], max_tokens=2048)
    unshuffled = vectors[np.argsort(order)]  # row k of the output belongs to input row order[k]
    assert np.abs(unshuffled - fidelity_vectors[sorted(order)]).max() <= ATOL
    assert np.abs(vectors - fidelity_vectors[order]).max() <= ATOL


def test_vectors_do_not_depend_on_how_rows_are_split_into_batches(
    minilm, fidelity_texts, fidelity_vectors, invariance_rows
):
    _, spec, encoder = minilm
    texts = [fidelity_texts[i] for i in invariance_rows]
    parts = []
    for start, stop in ((0, 1), (1, 12), (12, 20), (20, 32)):
        vectors, valid, _ = embed(spec, encoder, texts[start:stop], max_tokens=1024)
        assert valid.all()
        parts.append(vectors)
    assert np.abs(np.concatenate(parts) - fidelity_vectors[invariance_rows]).max() <= ATOL


# ---------------------------------------------------------------------------------------------
# sentence-transformers folder settings (tiny_st)


def test_read_folder_settings_of_a_sentence_transformers_folder(tiny_st):
    settings = read_folder_settings(tiny_st)
    assert settings.max_length == 48
    assert settings.pooling == "cls"
    assert settings.normalize is True
    assert settings.lowercase is False
    assert settings.prompts == {"query": "query: ", "passage": "passage: "}
    assert settings.default_prompt_name == "query"
    assert Path(settings.model_dir) == Path(tiny_st)


def test_read_folder_settings_of_a_plain_folder(tiny_bert):
    settings = read_folder_settings(tiny_bert)
    assert (settings.max_length, settings.pooling, settings.normalize, settings.prompts) == (None, None, False, {})


def test_tiny_st_spec_takes_the_folder_settings(st_folder):
    spec = st_folder.spec
    assert spec.options["max_length"] == 48 == st_folder.st.max_seq_length
    assert spec.options["pooling"] == "cls"
    assert spec.options["normalize"] is True
    assert spec.options["prefix"] == "query: "  # the default prompt
    assert st_folder.encoder.dim == 32


def test_tiny_st_matches_sentence_transformers(st_folder, tiny_texts):
    vectors, valid, prepared = embed(st_folder.spec, st_folder.encoder, tiny_texts)
    assert valid.all()
    assert max(len(c[0]) for c in prepared.values.to_pylist()) == 48  # some rows were truncated
    assert_rows_close(vectors, st_folder.st.encode(tiny_texts, convert_to_numpy=True))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_tiny_st_prompt_name_matches_sentence_transformers(st_folder, tiny_texts):
    spec = make_spec(st_folder.weights, {"prompt_name": "passage"}, dim=32)
    assert spec.options["prefix"] == "passage: "
    vectors, _, _ = embed(spec, st_folder.encoder, tiny_texts)
    expected = st_folder.st.encode(tiny_texts, prompt_name="passage", convert_to_numpy=True)
    assert_rows_close(vectors, expected)
    if st_folder.kind == "working-vocab":  # a vocabulary that tells 'query' and 'passage' apart
        query, _, _ = embed(st_folder.spec, st_folder.encoder, tiny_texts)
        assert np.abs(query - vectors).max() > 5 * ATOL  # so the comparison above can tell them apart


def test_tiny_st_explicit_prefix_matches_sentence_transformers_prompt(st_folder, tiny_texts):
    spec = make_spec(st_folder.weights, {"prefix": "the cat: "}, dim=32)
    assert spec.options["prefix"] == "the cat: "
    vectors, _, _ = embed(spec, st_folder.encoder, tiny_texts)
    assert_rows_close(vectors, st_folder.st.encode(tiny_texts, prompt="the cat: ", convert_to_numpy=True))


def test_empty_prefix_turns_the_default_prompt_off(st_folder, tiny_texts):
    spec = make_spec(st_folder.weights, {"prefix": ""}, dim=32)
    vectors, _, _ = embed(spec, st_folder.encoder, tiny_texts)
    assert_rows_close(vectors, st_folder.st.encode(tiny_texts, prompt="", convert_to_numpy=True))
    default, _, _ = embed(st_folder.spec, st_folder.encoder, tiny_texts)
    assert np.abs(default - vectors).max() > 5 * ATOL  # the prompt's two tokens change the CLS state


def test_prefix_and_prompt_name_together_raise(tiny_st):
    with pytest.raises(ValueError, match="either prefix or prompt_name"):
        make_spec(resolve_weights(tiny_st), {"prefix": "x: ", "prompt_name": "query"}, dim=32)


def test_undeclared_prompt_name_lists_the_declared_ones(tiny_st):
    with pytest.raises(ValueError) as info:
        make_spec(resolve_weights(tiny_st), {"prompt_name": "document"}, dim=32)
    assert "'document'" in str(info.value) and "query" in str(info.value) and "passage" in str(info.value)


def test_options_override_folder_settings(st_folder, tiny_texts):
    st = st_folder.st
    spec = make_spec(st_folder.weights, {"pooling": "mean", "normalize": False, "max_length": 16}, dim=32)
    assert (spec.options["pooling"], spec.options["normalize"], spec.options["max_length"]) == ("mean", False, 16)
    encoder = FAMILY.load(spec, CPU)
    vectors, _, prepared = embed(spec, encoder, tiny_texts)
    assert max(len(c[0]) for c in prepared.values.to_pylist()) == 16
    # Reference: sentence-transformers' own token states, mean-pooled by hand, no normalization.
    st.max_seq_length = 16
    try:
        states = st.encode(tiny_texts, output_value="token_embeddings", convert_to_numpy=False)
    finally:
        st.max_seq_length = 48
    expected = np.stack([s.float().mean(0).numpy() for s in states])
    assert_rows_close(vectors, expected)
    assert np.abs(np.linalg.norm(vectors, axis=1) - 1).max() > 1e-3  # really not normalized


# ---------------------------------------------------------------------------------------------
# Plain Hugging Face folder (tiny_bert): defaults and every pooling mode against AutoModel


def test_plain_folder_defaults(tiny_bert_default):
    spec, encoder = tiny_bert_default
    assert spec.options["pooling"] == "mean"
    assert spec.options["normalize"] is False
    assert spec.options["prefix"] == ""
    assert spec.options["max_length"] == 128  # max_position_embeddings; the tokenizer has no limit
    assert encoder.dim == 32


def _reference_pool(states: torch.Tensor, mode: str) -> torch.Tensor:
    """(t, d) token states of ONE unpadded sequence -> (d,)."""
    return {
        "mean": lambda: states.mean(0),
        "cls": lambda: states[0],
        "max": lambda: states.max(0).values,
        "last": lambda: states[-1],
    }[mode]()


@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_plain_folder_pooling_matches_automodel(tiny_bert_weights, tiny_bert_reference, tiny_texts, pooling):
    tokenizer, model = tiny_bert_reference
    spec = make_spec(tiny_bert_weights, {"pooling": pooling}, dim=32)
    encoder = FAMILY.load(spec, CPU)
    vectors, valid, prepared = embed(spec, encoder, tiny_texts)
    assert valid.all()
    ids = tokenizer(tiny_texts, truncation=True, max_length=128)["input_ids"]
    assert [c[0] for c in prepared.values.to_pylist()] == ids
    assert len({len(i) for i in ids}) > 5  # the batch really is padded
    with torch.no_grad():
        expected = torch.stack(
            [_reference_pool(model(input_ids=torch.tensor([row])).last_hidden_state[0], pooling) for row in ids]
        )
    assert np.abs(vectors - expected.numpy()).max() <= ATOL


def test_pooling_modes_give_different_vectors(tiny_bert_weights, tiny_texts):
    results = {}
    for pooling in POOLING_MODES:
        spec = make_spec(tiny_bert_weights, {"pooling": pooling}, dim=32)
        results[pooling] = embed(spec, FAMILY.load(spec, CPU), tiny_texts[:4])[0]
    for a in POOLING_MODES:
        for b in POOLING_MODES:
            if a < b:
                assert np.abs(results[a] - results[b]).max() > 1e-3, (a, b)


def test_plain_folder_normalize_gives_unit_vectors(tiny_bert_weights, tiny_bert_default, tiny_texts):
    spec, encoder = tiny_bert_default
    raw, _, _ = embed(spec, encoder, tiny_texts)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-2
    norm_spec = make_spec(tiny_bert_weights, {"normalize": True}, dim=32)
    vectors, _, _ = embed(norm_spec, FAMILY.load(norm_spec, CPU), tiny_texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert np.abs(vectors - unit(raw)).max() <= ATOL


# ---------------------------------------------------------------------------------------------
# Absent and bad values


ERROR_VALUE = re.compile(r"^([a-z_]+): \S.*$")


def assert_error(value, code):
    assert value is not None and "\n" not in value
    match = ERROR_VALUE.match(value)
    assert match, value
    assert match.group(1) == error_code(value) == code
    assert code in ERROR_CODES


def test_none_is_absent_not_an_error(tiny_bert_default):
    spec, encoder = tiny_bert_default
    vectors, valid, prepared = embed(spec, encoder, [None, "the cat", None])
    assert valid.tolist() == [False, True, False]
    assert prepared.errors == [None, None, None]
    assert prepared.values.to_pylist()[0] is None and prepared.values.to_pylist()[2] is None


def test_all_absent(tiny_bert_default):
    spec, encoder = tiny_bert_default
    vectors, valid, prepared = embed(spec, encoder, [None, None, None])
    assert not valid.any() and prepared.errors == [None] * 3


@pytest.mark.parametrize("value", ["", "   \n", "\t", "\u3000 \u2003"])
def test_empty_text_is_an_error(tiny_bert_default, value):
    spec, encoder = tiny_bert_default
    vectors, valid, prepared = embed(spec, encoder, [value, "the cat"])
    assert valid.tolist() == [False, True]
    assert_error(prepared.errors[0], "empty_text")
    assert prepared.errors[1] is None


@pytest.mark.parametrize("value", [5, 3.2, ["x"], True, {"a": "b"}])
def test_non_text_is_bad_type(tiny_bert_default, value):
    spec, encoder = tiny_bert_default
    vectors, valid, prepared = embed(spec, encoder, [value, None])
    assert valid.tolist() == [False, False]
    assert_error(prepared.errors[0], "bad_type")
    assert prepared.errors[1] is None


def test_invalid_utf8_bytes_fail_to_decode(tiny_bert_default):
    spec, encoder = tiny_bert_default
    vectors, valid, prepared = embed(spec, encoder, [b"\xff\xfe", b"the cat", None])
    assert valid.tolist() == [False, True, False]
    assert_error(prepared.errors[0], "decode_failed")
    assert prepared.errors[1:] == [None, None]


def test_valid_utf8_bytes_embed_like_the_string(minilm):
    _, spec, encoder = minilm
    texts = ["café ☕ naïve", MULTILINGUAL[2], MULTILINGUAL[5]]
    from_bytes, valid, _ = embed(spec, encoder, [t.encode("utf-8") for t in texts])
    from_str, _, _ = embed(spec, encoder, texts)
    assert valid.all()
    assert np.abs(from_bytes - from_str).max() <= ATOL


def test_too_long_text_by_characters_is_too_large(tiny_bert_weights, tiny_bert_default):
    _, encoder = tiny_bert_default
    spec = make_spec(tiny_bert_weights, {"max_chars": 20}, dim=32)
    vectors, valid, prepared = embed(spec, encoder, ["the cat " * 10, "the cat"])
    assert valid.tolist() == [False, True]
    assert_error(prepared.errors[0], "too_large")


def test_no_row_is_dropped_and_rows_stay_aligned(tiny_bert_default):
    spec, encoder = tiny_bert_default
    values = [None, "red shoe", "", "blue mug and coffee", "   ", "a cat", None, "dog"]
    vectors, valid, prepared = embed(spec, encoder, values)
    assert len(prepared.errors) == len(prepared.values) == len(vectors) == len(values)
    assert valid.tolist() == [False, True, False, True, False, True, False, True]
    assert [e is not None for e in prepared.errors] == [False, False, True, False, True, False, False, False]
    alone, _, _ = embed(spec, encoder, ["red shoe", "blue mug and coffee", "a cat", "dog"])
    assert np.abs(vectors[valid] - alone).max() <= ATOL
    assert not vectors[~valid].any()


def test_bad_rows_mixed_into_a_real_batch_keep_every_valid_vector(minilm, fidelity_texts, fidelity_vectors):
    _, spec, encoder = minilm
    values = list(fidelity_texts[:20])
    for position in (0, 5, 11, 19):
        values.insert(position, None)
    values.insert(3, "   ")
    vectors, valid, prepared = embed(spec, encoder, values)
    assert len(vectors) == len(values) == 25 and valid.sum() == 20
    assert np.abs(vectors[valid] - fidelity_vectors[:20]).max() <= ATOL


# ---------------------------------------------------------------------------------------------
# Long text


@pytest.fixture(scope="module")
def megabyte_text(real_texts):
    text = " ".join(real_texts)
    text = (text + " ") * (1_000_000 // len(text) + 1)
    return text[:1_000_000]


def test_megabyte_text_in_truncate_mode_is_its_first_256_tokens(minilm, minilm_st, megabyte_text):
    _, spec, encoder = minilm
    vectors, valid, prepared = embed(spec, encoder, [megabyte_text])
    assert valid.all()
    head = megabyte_text[:5000]  # far more than 256 tokens of text
    chunks = prepared.values.to_pylist()[0]
    assert len(chunks) == 1 and chunks[0] == minilm_st.tokenizer(head, truncation=True, max_length=256)["input_ids"]
    assert_rows_close(vectors, minilm_st.encode([head], convert_to_numpy=True))


def test_megabyte_text_in_chunk_mode(minilm_chunk, megabyte_text):
    spec, encoder = minilm_chunk
    vectors, valid, prepared = embed(spec, encoder, [megabyte_text])
    assert valid.all() and prepared.errors == [None]
    assert len(prepared.values.to_pylist()[0]) == 4  # max_chunks
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_chunk_mode_on_text_that_fits_equals_truncate_mode(minilm, minilm_chunk, fidelity_texts, minilm_st):
    weights, _, encoder = minilm
    chunk_spec, chunk_encoder = minilm_chunk
    lengths = [len(i) for i in minilm_st.tokenizer(fidelity_texts, verbose=False)["input_ids"]]
    texts = [t for t, n in zip(fidelity_texts, lengths) if n <= 64][:10]
    truncate_spec = make_spec(weights, {"max_length": 64}, dim=384)
    chunked, _, prepared = embed(chunk_spec, chunk_encoder, texts)
    assert all(len(c) == 1 for c in prepared.values.to_pylist())
    truncated, _, _ = embed(truncate_spec, encoder, texts)
    assert np.abs(chunked - truncated).max() <= ATOL


@pytest.fixture(scope="module")
def chunk_text(real_texts, minilm_st):
    """A real text of 300..2000 content tokens."""
    text = " ".join(real_texts[:40])
    while len(minilm_st.tokenizer(text, add_special_tokens=False)["input_ids"]) > 2000:
        text = text[: len(text) // 2]
    assert len(minilm_st.tokenizer(text, add_special_tokens=False)["input_ids"]) > 300
    return text


@pytest.mark.parametrize("max_chunks", [2, 4, 100])
def test_chunk_windows_overlap_and_cover_the_text(minilm, minilm_st, chunk_text, max_chunks):
    weights, _, _ = minilm
    options = {**CHUNK_OPTIONS, "max_chunks": max_chunks}
    spec = make_spec(weights, options, dim=384)
    chunks = FAMILY.prepare(spec, "text", pa.array([chunk_text])).values.to_pylist()[0]
    tokenizer = minilm_st.tokenizer
    content = tokenizer(chunk_text, add_special_tokens=False)["input_ids"]
    window, overlap = 64 - 2, 16
    needed = -(-(len(content) - overlap) // (window - overlap))
    assert len(chunks) == min(needed, max_chunks)
    for chunk in chunks:
        assert len(chunk) <= 64
        assert chunk[0] == tokenizer.cls_token_id and chunk[-1] == tokenizer.sep_token_id
    bodies = [c[1:-1] for c in chunks]
    for a, b in zip(bodies, bodies[1:]):
        assert len(a) == window
        assert a[-overlap:] == b[:overlap]  # consecutive chunks share chunk_overlap content tokens
    joined = bodies[0] + [t for b in bodies[1:] for t in b[overlap:]]
    assert joined == content[: len(joined)]
    if len(chunks) == needed:
        assert joined == content  # nothing lost when max_chunks does not bind


def test_chunk_vector_is_the_normalized_mean_of_chunk_embeddings(minilm_chunk, minilm_st, chunk_text):
    spec, encoder = minilm_chunk
    vectors, valid, prepared = embed(spec, encoder, [chunk_text, "a short one"])
    chunks = prepared.values.to_pylist()[0]
    assert len(chunks) == 4
    with torch.no_grad():  # sentence-transformers' own pipeline on each chunk's exact token ids
        per_chunk = []
        for ids in chunks:
            ids = torch.tensor([ids])
            features = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": torch.zeros_like(ids),
            }
            per_chunk.append(minilm_st(features)["sentence_embedding"][0].numpy())
    expected = unit(np.mean(per_chunk, axis=0))
    assert_rows_close(vectors[:1], expected[None])


def test_every_chunk_carries_the_prompt(minilm, minilm_st, chunk_text):
    weights, _, _ = minilm
    spec = make_spec(weights, {**CHUNK_OPTIONS, "prefix": "query: "}, dim=384)
    chunks = FAMILY.prepare(spec, "text", pa.array([chunk_text])).values.to_pylist()[0]
    prompt = minilm_st.tokenizer("query: ", add_special_tokens=False)["input_ids"]
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk[1 : 1 + len(prompt)] == prompt


# ---------------------------------------------------------------------------------------------
# Options validation


def test_unknown_option_is_named_and_valid_ones_listed(tiny_bert_weights):
    with pytest.raises(ValueError) as info:
        make_spec(tiny_bert_weights, {"poolin": "mean"}, dim=32)
    message = str(info.value)
    assert "'poolin'" in message and "\n" not in message
    for name in TEXT_OPTIONS:
        assert name in message


@pytest.mark.parametrize(
    "options, name",
    [
        ({"normalize": "yes"}, "normalize"),
        ({"normalize": 1}, "normalize"),
        ({"max_length": 3.0}, "max_length"),
        ({"max_length": True}, "max_length"),
        ({"max_length": "128"}, "max_length"),
        ({"pooling": 1}, "pooling"),
        ({"max_chunks": 2.5}, "max_chunks"),
        ({"trust_remote_code": "no"}, "trust_remote_code"),
    ],
)
def test_wrong_type_is_named(tiny_bert_weights, options, name):
    with pytest.raises(ValueError, match=f"option '{name}' must be"):
        make_spec(tiny_bert_weights, options, dim=32)


def test_invalid_long_text_lists_the_valid_values(tiny_bert_weights):
    with pytest.raises(ValueError) as info:
        make_spec(tiny_bert_weights, {"long_text": "split"}, dim=32)
    assert "'split'" in str(info.value)
    for mode in LONG_TEXT_MODES:
        assert mode in str(info.value)


def test_invalid_pooling_lists_the_valid_modes(tiny_bert_weights):
    with pytest.raises(ValueError) as info:
        make_spec(tiny_bert_weights, {"pooling": "avg"}, dim=32)
    assert all(mode in str(info.value) for mode in POOLING_MODES)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"long_text": "chunk", "chunk_overlap": 64}, "chunk_overlap"),
        ({"long_text": "chunk", "chunk_overlap": -1}, "chunk_overlap"),
        ({"max_chunks": 0}, "max_chunks"),
        ({"precision": "fp64"}, "precision"),
    ],
)
def test_out_of_range_values_raise(tiny_bert_weights, options, match):
    with pytest.raises(ValueError, match=match):
        make_spec(tiny_bert_weights, options, dim=32)


@pytest.mark.parametrize("max_length", [200, 0, -5])
def test_max_length_beyond_the_model_raises(tiny_bert_weights, max_length):
    with pytest.raises(ValueError, match="max_length"):
        make_spec(tiny_bert_weights, {"max_length": max_length}, dim=32)


@pytest.mark.parametrize(
    "options, name",
    [
        ({"max_chunks": None}, "max_chunks"),
        ({"long_text": "chunk", "chunk_overlap": None}, "chunk_overlap"),
        ({"max_chars": None}, "max_chars"),
    ],
)
def test_explicit_null_option_is_a_default_or_a_named_error(tiny_bert_weights, options, name):
    try:
        spec = make_spec(tiny_bert_weights, options, dim=32)
    except ValueError as exc:
        assert name in str(exc)
        return
    prepared = FAMILY.prepare(spec, "text", pa.array(["the cat"]))
    assert prepared.errors == [None]


# ---------------------------------------------------------------------------------------------
# The output dimension


def test_dim_comes_from_the_meta_device_without_loading_weights(tiny_bert_weights, tmp_path, monkeypatch):
    from transformers import AutoModel

    monkeypatch.setenv("OMNIEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(FAMILY, "load", lambda spec, device: pytest.fail("the model was loaded to probe D"))
    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("weights were read to probe D"))
    assert make_spec(tiny_bert_weights, dim=None).dim == 32
    assert make_spec(tiny_bert_weights, {"pooling": "cls"}, dim=None).dim == 32


def test_dim_is_probed_and_cached(tiny_bert_weights, tmp_path, monkeypatch):
    """A model that cannot run on the meta device is probed once on the CPU, then cached."""
    import encoders.text.hf_text as hf_text

    monkeypatch.setattr(hf_text, "_meta_dim", lambda spec: None)
    monkeypatch.setenv("OMNIEMBED_CACHE", str(tmp_path / "cache"))
    cache_file = tmp_path / "cache" / "probed_dims.json"
    loads = []
    real_load = FAMILY.load

    def counting_load(spec, device):
        loads.append(spec.options["pooling"])
        return real_load(spec, device)

    monkeypatch.setattr(FAMILY, "load", counting_load)
    spec = make_spec(tiny_bert_weights, dim=None)
    assert spec.dim == 32 and loads == ["mean"]
    assert cache_file.is_file() and list(json.loads(cache_file.read_text()).values()) == [32]

    again = make_spec(tiny_bert_weights, {"normalize": True}, dim=None)  # same model and pooling
    assert again.dim == 32 and loads == ["mean"], "the second probe should come from the cache"

    make_spec(tiny_bert_weights, {"pooling": "cls"}, dim=None)
    assert loads == ["mean", "cls"]
    assert sorted(json.loads(cache_file.read_text()).values()) == [32, 32]


def test_cached_dim_is_used_without_probing(tiny_bert_weights, tmp_path, monkeypatch):
    import encoders.text.hf_text as hf_text

    monkeypatch.setattr(hf_text, "_meta_dim", lambda spec: None)
    monkeypatch.setenv("OMNIEMBED_CACHE", str(tmp_path))
    make_spec(tiny_bert_weights, dim=None)
    monkeypatch.setattr(FAMILY, "load", lambda spec, device: pytest.fail("probe ran despite the cache"))
    assert make_spec(tiny_bert_weights, dim=None).dim == 32


def test_encoder_rejects_a_spec_dim_that_disagrees(tiny_bert_weights):
    spec = make_spec(tiny_bert_weights, dim=31)
    assert spec.dim == 31  # an explicit dim is not probed
    with pytest.raises(RuntimeError, match=r"32-d.*expected 31"):
        FAMILY.load(spec, CPU)
