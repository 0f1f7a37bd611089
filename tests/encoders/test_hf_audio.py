"""hf-audio (AST, wav2vec2, HuBERT) and hf-clap (text and audio in one space): tiny configs saved
with save_pretrained, planned and loaded through the real path, compared on espeak-ng speech with
a direct transformers call on the model's own feature extractor's output for the same prepared
waveform windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from encoders import FAMILIES
from tests.audio_data import SENTENCES, speak
from tests.conftest import TINY_LAYERS
from tests.encoders.test_image_cnn import cosine

LONG_TEXT = " ".join(SENTENCES[:3])  # about 13 s of espeak speech


def plan(model: str, columns: dict[str, str] | None = None, **options):
    from pipeline.config import config_from_dict
    from pipeline.plan import plan_encoders

    entry = {"output": "a", "model": model, **options, **({"columns": columns} if columns else {"column": "audio"})}
    config = config_from_dict(
        {"sources": [{"path": "x", "id_column": "id"}], "output": {"path": "o"}, "encoders": [entry]}
    )
    return plan_encoders(config.encoders)[0]


def save_tiny_ast(folder: Path) -> Path:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    config = ASTConfig(
        **TINY_LAYERS, num_mel_bins=32, max_length=200, patch_size=16, frequency_stride=10, time_stride=10
    )
    ASTModel(config).eval().save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=32, max_length=200).save_pretrained(folder)  # 200 frames: 2.015 s windows
    return folder


WAVEFORM_KINDS = ("wav2vec2-group", "wav2vec2-layer-mask", "hubert")


def save_tiny_waveform(folder: Path, kind: str) -> Path:
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(1)
    common = dict(
        **TINY_LAYERS,
        conv_dim=(32, 32, 32),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    norm = "layer" if kind == "wav2vec2-layer-mask" else "group"
    if kind == "hubert":
        HubertModel(HubertConfig(feat_extract_norm=norm, **common)).eval().save_pretrained(folder)
    else:
        Wav2Vec2Model(Wav2Vec2Config(feat_extract_norm=norm, **common)).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=norm == "layer").save_pretrained(folder)
    return folder


def save_tiny_clap(folder: Path) -> Path:
    """CLAP at 8 kHz with the extractor's 10 s windows (251 frames fit the tiny Swin's 256)."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("o", "g"), ("Ġd", "og")]
    for token in [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
        "<mask>",
        *bytes_to_unicode().values(),
        "Ġt",
        "he",
        "Ġthe",
        "og",
        "Ġd",
        "Ġdog",
    ]:
        vocab.setdefault(token, len(vocab))
    RobertaTokenizerFast(vocab=vocab, merges=merges).save_pretrained(folder)
    ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=8000,
        hop_length=320,
        max_length_s=10,
        fft_window_size=512,
        frequency_min=50,
        frequency_max=3800,
    ).save_pretrained(folder)
    torch.manual_seed(2)
    text = dict(vocab_size=len(vocab), **TINY_LAYERS, max_position_embeddings=66)
    audio = dict(
        spec_size=64,
        num_mel_bins=16,
        patch_embeds_hidden_size=8,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        window_size=4,
        hidden_size=16,
        patch_stride=(4, 4),
        patch_size=4,
        enable_fusion=True,
    )
    model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=24)).eval()
    with torch.no_grad():  # CLAP's default init (std 0.02) gives nearly one vector for every text
        for weight in model.text_model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("speech")
    clips = {"short": SENTENCES[0], "other": SENTENCES[1], "long": LONG_TEXT}
    return {name: speak(folder / f"{name}.wav", text).read_bytes() for name, text in clips.items()}


@pytest.fixture(scope="module")
def ast_folder(tmp_path_factory) -> str:
    return str(save_tiny_ast(tmp_path_factory.mktemp("ast")))


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory) -> str:
    return str(save_tiny_clap(tmp_path_factory.mktemp("clap")))


def prepared_clips(spec, clips: list[bytes | None]):
    prepared = FAMILIES.get(spec.family).prepare(spec, "audio", pa.array(clips, type=pa.binary()))
    return prepared, [None if v is None else np.asarray(v, dtype=np.float32) for v in prepared.values.to_pylist()]


def window_count(samples: int, window: int, hop: int, max_windows: int) -> int:
    """Windows of a clip by the rule of encoders/audio/prepare.py: enough to cover it, the last dropped
    when under half audio (never the only one), at most max_windows."""
    count = 1 + max(0, int(np.ceil((samples - window) / hop)))
    if count > 1 and samples - (count - 1) * hop < window / 2:
        count -= 1
    return min(count, max_windows)


def direct_windows(wave: np.ndarray, window: int, hop: int, count: int) -> list[np.ndarray]:
    """The real samples of each of a clip's first ``count`` windows (starts 0, hop, 2 hop, ...)."""
    return [wave[k * hop : k * hop + window] for k in range(count)]


def test_model_type_picks_the_family_and_probes_dim(ast_folder, clap_folder, tmp_path):
    ast = plan(ast_folder)
    assert (ast.family, ast.dim, ast.options["pooling"]) == ("hf-audio", 32, "cls")
    prep = ast.options["preprocessing"]
    assert prep["sample_rate"] == 16000 and prep["window_seconds"] == pytest.approx((400 + 199 * 160) / 16000)
    hubert = plan(str(save_tiny_waveform(tmp_path / "hubert", "hubert")))
    assert (hubert.family, hubert.dim, hubert.options["preprocessing"]["window_seconds"]) == ("hf-audio", 32, 10.0)
    clap = plan(clap_folder, columns={"text": "caption", "audio": "audio"})
    assert (clap.family, clap.dim, clap.options["preprocessing"]["window_seconds"]) == ("hf-clap", 24, 10.0)


def test_dim_without_reading_weights(ast_folder, clap_folder, tmp_path, monkeypatch):
    from transformers import ClapModel

    monkeypatch.setenv("OMNIEMBED_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(ClapModel, "from_pretrained", lambda *a, **k: pytest.fail("weights were read to probe D"))
    assert plan(clap_folder, columns={"text": "caption", "audio": "audio"}).dim == 24
    from transformers import AutoModel

    monkeypatch.setattr(AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("weights were read to probe D"))
    assert plan(ast_folder).dim == 32  # hf-audio: the config's width, exact for its poolings


def test_options_are_validated(ast_folder):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown option 'pool'.*valid options: pooling, normalize"):
        plan(ast_folder, pool="cls")
    with pytest.raises(ConfigError, match="valid modes: cls, mean"):
        plan(ast_folder, pooling="max")
    with pytest.raises(ConfigError, match="longer than the model takes"):
        plan(ast_folder, preprocessing={"window_seconds": 5.0})
    with pytest.raises(ConfigError, match="not the model's rate"):
        plan(ast_folder, preprocessing={"sample_rate": 8000})


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_ast_fidelity_and_windows(ast_folder, speech, pooling):
    from transformers import ASTFeatureExtractor, ASTModel

    # Windows of 2.015 s every 1 s, at most 3 (starts 0, 1, 2 s).
    spec = plan(ast_folder, pooling=pooling, hop_seconds=1.0, max_windows=3)
    prepared, waves = prepared_clips(spec, [speech["short"], speech["long"], None, b"junk", speech["other"]])
    assert prepared.errors[2] is None and prepared.errors[3].startswith("decode_failed")
    result = FAMILIES.get("hf-audio").load(spec, torch.device("cpu"))("audio", prepared.values)
    vectors, valid, extras = result.vectors, result.valid, result.extras
    assert valid.tolist() == [True, True, False, False, True]

    extractor, model = ASTFeatureExtractor.from_pretrained(ast_folder), ASTModel.from_pretrained(ast_folder).eval()
    window, hop = 400 + 199 * 160, 16000
    expected_counts = []
    for row in (0, 1, 4):
        count = window_count(len(waves[row]), window, hop, 3)
        expected_counts.append(count)
        clips = direct_windows(waves[row], window, hop, count)
        features = extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
        with torch.no_grad():
            out = model(input_values=features)
        per_window = out.pooler_output if pooling == "cls" else out.last_hidden_state[:, 2:].mean(1)
        assert cosine(vectors[row : row + 1], per_window.mean(0, keepdim=True).numpy())[0] >= 0.9999
    assert extras["windows"][[0, 1, 4]].tolist() == expected_counts and expected_counts[1] == 3
    assert extras["windows"][[2, 3]].tolist() == [0, 0]


@pytest.mark.parametrize("kind", WAVEFORM_KINDS)
def test_waveform_fidelity(tmp_path, speech, kind):
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    folder = str(save_tiny_waveform(tmp_path / kind, kind))
    # 1.5 s windows every 1.5 s: clips of different lengths give tails of different lengths in
    # one micro-batch (padded and masked, or run apart when the model takes no mask).
    spec = plan(folder, preprocessing={"window_seconds": 1.5}, micro_batch=4)
    prepared, waves = prepared_clips(spec, [speech["short"], speech["other"], speech["long"]])
    result = FAMILIES.get("hf-audio").load(spec, torch.device("cpu"))("audio", prepared.values)
    vectors, valid, extras = result.vectors, result.valid, result.extras
    assert valid.all()

    extractor, model = Wav2Vec2FeatureExtractor.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    window = 24000
    for row, wave in enumerate(waves):
        count = window_count(len(wave), window, window, 16)
        per_window = []
        for clip in direct_windows(wave, window, window, count):  # one window per call: no padding at all
            inputs = extractor(clip, sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                per_window.append(model(**inputs).last_hidden_state.mean(1))
        assert extras["windows"][row] == count
        assert cosine(vectors[row : row + 1], torch.cat(per_window).mean(0, keepdim=True).numpy())[0] >= 0.9999


def test_wav2vec2_rejects_other_pooling(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="valid modes: mean"):
        plan(str(save_tiny_waveform(tmp_path / "w", "wav2vec2-group")), pooling="cls")


def clap_reference(model, extractor, clips: list[np.ndarray]) -> torch.Tensor:
    """get_audio_features on the extractor's output; is_longer False for every window (each is at
    most max_length_s; the extractor would mark one at random, see encoders/audio/features.py)."""
    inputs = extractor(clips, sampling_rate=extractor.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        out = model.get_audio_features(
            input_features=inputs["input_features"], is_longer=torch.zeros((len(clips), 1), dtype=torch.bool)
        )
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clap_text_and_audio_share_a_space(clap_folder, speech):
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    spec = plan(clap_folder, columns={"text": "caption", "audio": "audio"})
    family = FAMILIES.get("hf-clap")
    encoder = family.load(spec, torch.device("cpu"))
    texts = ["the dog", "a bird sings in the morning", "", None]
    prepared_text = family.prepare(spec, "text", pa.array(texts))
    assert prepared_text.errors[2].startswith("empty_text") and prepared_text.errors[3] is None
    result = encoder("text", prepared_text.values)
    text_vectors, text_valid = result.vectors, result.valid
    assert text_valid.tolist() == [True, True, False, False]
    prepared, waves = prepared_clips(spec, [speech["short"], speech["other"]])
    result = encoder("audio", prepared.values)
    audio_vectors, audio_valid, extras = result.vectors, result.valid, result.extras
    assert audio_valid.all() and extras["windows"].tolist() == [1, 1]

    model, extractor = ClapModel.from_pretrained(clap_folder).eval(), ClapFeatureExtractor.from_pretrained(clap_folder)
    tokenizer = AutoTokenizer.from_pretrained(clap_folder)
    with torch.no_grad():
        text_ref = model.get_text_features(**tokenizer(texts[:2], padding=True, return_tensors="pt"))
    text_ref = text_ref if isinstance(text_ref, torch.Tensor) else text_ref.pooler_output
    audio_ref = clap_reference(model, extractor, waves)
    assert cosine(text_vectors[:2], text_ref.numpy()).min() >= 0.9999
    assert cosine(text_vectors[:1], text_vectors[1:2])[0] < 0.99  # the texts really differ
    assert cosine(audio_vectors, audio_ref.numpy()).min() >= 0.9999
    # One space: text-to-audio similarities are CLAP's own.
    assert np.allclose(text_vectors[:2] @ audio_vectors.T, (text_ref @ audio_ref.T).numpy(), atol=1e-4)


def test_clap_long_clip_is_windowed_and_deterministic(clap_folder, speech):
    from transformers import ClapFeatureExtractor, ClapModel

    spec = plan(clap_folder, columns={"text": "caption", "audio": "audio"}, hop_seconds=5.0)
    encoder = FAMILIES.get("hf-clap").load(spec, torch.device("cpu"))
    prepared, waves = prepared_clips(spec, [speech["long"]])
    assert len(waves[0]) > 10 * 8000  # longer than the model's 10 s
    result = encoder("audio", prepared.values)
    first, _, extras = result.vectors, result.valid, result.extras
    result = encoder("audio", prepared.values)
    second, _, _ = result.vectors, result.valid, result.extras
    count = window_count(len(waves[0]), 80000, 40000, 16)
    assert extras["windows"].tolist() == [count] and count > 1 and np.array_equal(first, second)
    model, extractor = ClapModel.from_pretrained(clap_folder).eval(), ClapFeatureExtractor.from_pretrained(clap_folder)
    per_window = clap_reference(model, extractor, direct_windows(waves[0], 80000, 40000, count))
    reference = torch.nn.functional.normalize(per_window.mean(0, keepdim=True), dim=1)
    assert cosine(first, reference.numpy())[0] >= 0.9999
