"""Audio end to end on the session's Ray: a folder of real and bad clips through the CLI (error
values, no row lost, window counts), and one manifest with text, image and audio columns giving
one aligned row per id."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoders import FAMILIES
from encoders.core.errors import error_code
from pipeline.cli import main as cli_main
from tests.audio_data import SENTENCES, speak, write_bad_files, write_long_wav
from tests.image_data import encode, real_photos


@pytest.fixture(scope="module")
def resemblyzer_available():
    import importlib.util

    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("resemblyzer weights not installed (pip install --no-deps resemblyzer==0.1.4)")


def plan(model: str, modality: str, **options):
    from pipeline.config import config_from_dict
    from pipeline.plan import plan_encoders

    config = config_from_dict(
        {
            "sources": [{"path": "x", "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [{"output": "v", "column": modality, "model": model, **options}],
        }
    )
    return plan_encoders(config.encoders)[0]


def direct(model: str, modality: str, values: list, **options) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the family's own prepare and model, called outside Ray."""
    spec = plan(model, modality, **options)
    family = FAMILIES.get(spec.family)
    result = family.load(spec, torch.device("cpu"))(modality, family.prepare(spec, modality, pa.array(values)).values)
    vectors, valid, rest = result.vectors, result.valid, result.extras
    assert valid.all()
    return vectors, (rest["windows"] if rest else None)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_audio_folder_with_bad_and_long_clips(ray_session, resemblyzer_available, tmp_path):
    clips = tmp_path / "clips"
    expected = {f"bad/{name}": code for name, code in write_bad_files(clips / "bad").items() if name != "missing.wav"}
    (clips / "long").mkdir()
    write_long_wav(clips / "long" / "ten_minutes.wav", 600, source=clips / "bad" / "voice.wav")
    expected["long/ten_minutes.wav"] = None
    (clips / "notes.txt").write_text("not listed: not an audio suffix")
    out = tmp_path / "out"
    flags = "--kind audio --audio-model resemblyzer --max-windows 8 --max-error-rate 0.9 --precision fp32".split()
    assert cli_main(["embed", str(clips), "--output", str(out), *flags]) == 0
    table = pq.read_table(out).sort_by("id")
    assert table.column_names == ["id", "audio_embedding", "audio_error", "audio_windows"]
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(expected)  # every file exactly once, bad ones included
    for name, code in expected.items():
        row = rows[name]
        assert (row["audio_error"] and error_code(row["audio_error"])) == code, (name, row["audio_error"])
        assert (row["audio_embedding"] is None) == (code is not None) == (row["audio_windows"] is None), name
        if code is None:
            assert len(row["audio_embedding"]) == 256 and 1 <= row["audio_windows"] <= 8
    assert rows["long/ten_minutes.wav"]["audio_windows"] == 8  # capped; the rest is never read
    meta = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"omniembed"])
    assert meta["encoders"]["audio"]["dim"] == 256 and meta["encoders"]["audio"]["model"] == "resemblyzer"

    names = ["bad/voice.wav", "bad/48k_stereo.wav", "bad/voice.flac", "long/ten_minutes.wav"]
    reference, windows = direct("resemblyzer", "audio", [str(clips / n) for n in names], max_windows=8)
    for name, vector, count in zip(names, reference, windows):
        assert cosine(rows[name]["audio_embedding"], vector) >= 0.9999, name
        assert rows[name]["audio_windows"] == count


def test_text_image_audio_rows_align(ray_session, resemblyzer_available, tiny_bert, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="extra 'weights' not installed")
    voice = speak(tmp_path / "a" / "stella.wav", SENTENCES[1], "en+f2")
    other = speak(tmp_path / "a" / "ship.wav", SENTENCES[2], "en+m3")
    photo = tmp_path / "i" / "cat.jpg"
    photo.parent.mkdir()
    photo.write_bytes(encode(real_photos()["chelsea"]))
    rows = [
        {"id": "all", "title": "red cat mug", "photo": str(photo), "note": str(voice)},
        {"id": "text-only", "title": "blue shoe"},
        {"id": "image-only", "photo": str(photo)},
        {"id": "audio-only", "note": str(other)},
        {"id": "bad-audio", "title": "green tea", "note": str(tmp_path / "a" / "missing.wav")},
        {"id": "nothing"},
    ]
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    config = {
        "sources": [{"path": str(source), "id_column": "id"}],
        "encoders": [
            # Compared with fp32 references below: precision pinned.
            {"output": "title", "column": "title", "model": tiny_bert, "precision": "fp32"},
            {"output": "photo", "column": "photo", "model": "efficientnet-lite0", "precision": "fp32"},
            {"output": "note", "column": "note", "model": "resemblyzer", "precision": "fp32"},
        ],
        "output": {"path": str(out), "max_error_rate": 0.5},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    assert cli_main(["run", str(config_path)]) == 0
    table = pq.read_table(out)
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)  # one row per id
    got = {r["id"]: r for r in table.to_pylist()}
    present = {
        "title": {"all", "text-only", "bad-audio"},
        "photo": {"all", "image-only"},
        "note": {"all", "audio-only"},
    }
    for output, ids in present.items():
        for row_id, row in got.items():
            assert (row[f"{output}_embedding"] is not None) == (row_id in ids), (output, row_id)
            if row_id != "bad-audio" or output != "note":
                assert row[f"{output}_error"] is None, (output, row_id)  # absent is not an error
    assert error_code(got["bad-audio"]["note_error"]) == "missing_file" and got["bad-audio"]["note_windows"] is None
    assert got["nothing"]["note_windows"] is None and got["all"]["note_windows"] >= 1

    # Each vector is the one its own model gives for that row's input, side by side in the row.
    notes, _ = direct("resemblyzer", "audio", [str(voice), str(other)])
    assert cosine(got["all"]["note_embedding"], notes[0]) >= 0.9999
    assert cosine(got["audio-only"]["note_embedding"], notes[1]) >= 0.9999
    photos, _ = direct("efficientnet-lite0", "image", [str(photo)])
    assert cosine(got["all"]["photo_embedding"], photos[0]) >= 0.9999
    assert cosine(got["image-only"]["photo_embedding"], photos[0]) >= 0.9999
    titles, _ = direct(tiny_bert, "text", ["red cat mug", "blue shoe"])
    assert cosine(got["all"]["title_embedding"], titles[0]) >= 0.9999
    assert cosine(got["text-only"]["title_embedding"], titles[1]) >= 0.9999


def test_api_puts_extra_columns_last_as_the_output_does(ray_session, resemblyzer_available, tiny_bert, tmp_path):
    """The audio encoder first, then a text one: from the API as in the output files, every
    encoder's vector and error columns come first and the audio window count last."""
    import ray

    from pipeline import embed

    voice = speak(tmp_path / "a" / "stella.wav", SENTENCES[1], "en+f2")
    rows = [{"id": "a", "title": "red cat mug", "note": str(voice)}, {"id": "b", "title": "blue shoe", "note": None}]
    encoders = [
        {"output": "note", "column": "note", "model": "resemblyzer"},
        {"output": "title", "column": "title", "model": tiny_bert},
    ]
    got = embed(ray.data.from_items(rows), {"encoders": encoders}).take_all()
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"sources": [{"path": str(source), "id_column": "id"}], "encoders": encoders}
    (tmp_path / "c.yaml").write_text(json.dumps({**config, "output": {"path": str(tmp_path / "out")}}))
    assert cli_main(["run", str(tmp_path / "c.yaml")]) == 0
    order = ["id", "title", "note", "note_embedding", "note_error", "title_embedding", "title_error", "note_windows"]
    assert list(got[0]) == pq.read_table(tmp_path / "out").column_names == order
    windows = {r["id"]: r["note_windows"] for r in got}
    assert windows["a"] >= 1 and windows["b"] is None
