"""The decode rules of encoders/image/prepare.py, on real photos in every format and mode, and bad
files as error values with no row lost."""

from __future__ import annotations

import contextlib
import io
import types

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from encoders.core.errors import error_code
from encoders.image.prepare import ImagePreprocess, decode_rgb, prepare_images, resize_crop
from encoders.image.tensors import images_to_tensor
from tests.image_data import encode, real_photos, write_bad_files

PREP = ImagePreprocess.from_options({"preprocessing": {"resize": 64, "crop": 56, "mean": [0.5] * 3, "std": [0.25] * 3}})


def as_hwc(chw: torch.Tensor) -> np.ndarray:
    assert chw.dtype == torch.uint8 and chw.shape[0] == 3
    return chw.permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return real_photos()["chelsea"]


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_exactly(photo, fmt):
    save = {"lossless": True} if fmt == "WEBP" else {}
    assert np.array_equal(as_hwc(decode_rgb(encode(photo, fmt, **save))), photo)


def test_jpeg_torchvision_matches_pillow(photo):
    data = encode(photo, quality=95)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    # Both are libjpeg; IDCT and upsampling may differ by a level or two.
    assert np.abs(as_hwc(decode_rgb(data)).astype(int) - pillow).mean() < 1.0


def test_grayscale_palette_and_cmyk_become_rgb(photo):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    out = as_hwc(decode_rgb(encode(gray, "PNG")))
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    palette = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    assert np.array_equal(as_hwc(decode_rgb(buffer.getvalue())), np.asarray(palette.convert("RGB")))
    cmyk = Image.fromarray(photo).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, "TIFF")
    assert np.array_equal(as_hwc(decode_rgb(buffer.getvalue())), np.asarray(cmyk.convert("RGB")))


def test_sixteen_bit_is_shifted_not_saturated(photo):
    gray = np.asarray(Image.fromarray(photo).convert("L")).astype(np.uint16)
    wide = (gray << 8) | 0x7F  # high byte = the 8-bit image
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, "PNG")  # 16-bit gray PNG
    assert np.array_equal(as_hwc(decode_rgb(buffer.getvalue()))[..., 0], gray.astype(np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, "TIFF")  # 16-bit gray TIFF
    assert np.array_equal(as_hwc(decode_rgb(buffer.getvalue()))[..., 1], gray.astype(np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_alpha_is_composited_on_white(photo, fmt):
    rgba = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])
    rgba[: photo.shape[0] // 2, :, 3] = 255  # top half opaque, bottom half transparent
    if fmt == "GIF":
        image = Image.fromarray(rgba).convert("P", palette=Image.Palette.ADAPTIVE)
        buffer = io.BytesIO()
        image.save(buffer, "GIF", transparency=0)
        data = buffer.getvalue()
    else:
        data = encode(rgba, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = as_hwc(decode_rgb(data))
    if fmt != "GIF":
        assert np.array_equal(out[photo.shape[0] // 2 :], np.full_like(out[photo.shape[0] // 2 :], 255))
        assert np.array_equal(out[: photo.shape[0] // 2], photo[: photo.shape[0] // 2])
    else:
        transparent = np.asarray(Image.open(io.BytesIO(data))) == 0
        assert transparent.any() and (out[transparent] == 255).all()


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(photo, quality=95, exif=exif.tobytes())
    out = decode_rgb(data)
    assert out.shape[1:] == (photo.shape[1], photo.shape[0])
    upright = np.asarray(Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270).convert("RGB")).astype(int)
    assert np.abs(as_hwc(out).astype(int) - upright).mean() < 1.0


def test_animated_gif_gives_its_first_frame(photo):
    frames = [Image.fromarray(photo).quantize(64), Image.fromarray(255 - photo).quantize(64)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert np.array_equal(as_hwc(decode_rgb(buffer.getvalue())), np.asarray(frames[0].convert("RGB")))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("keep_aspect", [True, False])
def test_resize_crop_gives_torchvisions_bytes_from_either_memory_layout(photo, interpolation, keep_aspect):
    """Decoders give (h, w, 3) memory, which resize_crop reads as it is: the bytes out equal
    torchvision's own resize and center crop of a contiguous (3, h, w) copy."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    prep = ImagePreprocess(64, 56, (0.5,) * 3, (0.25,) * 3, interpolation, keep_aspect)
    hwc = torch.from_numpy(photo).permute(2, 0, 1)  # (3, h, w) over (h, w, 3) memory
    size = [64] if keep_aspect else [64, 64]
    resized = F.resize(hwc.contiguous(), size, interpolation=InterpolationMode(interpolation), antialias=True)
    expected = F.center_crop(resized, [56, 56])
    for image in (hwc, hwc.contiguous()):
        out = resize_crop(image, prep)
        assert out.shape == (3, 56, 56) and out.dtype == torch.uint8 and out.is_contiguous()
        assert torch.equal(out, expected), (interpolation, keep_aspect, image.stride())


def test_bad_files_become_error_values_and_no_row_is_lost(tmp_path):
    expected = write_bad_files(tmp_path)
    paths = [str(tmp_path / name) for name in expected] + [str(tmp_path / "missing.jpg"), None]
    raw = [(tmp_path / name).read_bytes() for name in expected]
    for values in (paths, raw):
        prepared = prepare_images(pa.array(values), PREP)
        assert len(prepared.values) == len(values) == len(prepared.errors)
        for i, name in enumerate(expected):
            got = prepared.errors[i]
            assert (got and error_code(got)) == expected[name], (name, got)
            assert (prepared.values[i].as_py() is None) == (expected[name] is not None)
    assert error_code(prepare_images(pa.array(paths), PREP).errors[len(expected)]) == "missing_file"
    # The absent row stays absent: null value, no error.
    tail = prepare_images(pa.array(paths), PREP)
    assert tail.values[-1].as_py() is None and tail.errors[-1] is None
    images, valid = images_to_tensor(prepare_images(pa.array(paths), PREP).values, PREP.crop)
    assert images.shape == (int(valid.sum()), 3, 56, 56) == (2, 3, 56, 56)


def test_pixel_limit_is_configurable(photo):
    data = encode(photo, "PNG")
    limited = prepare_images(pa.array([data]), PREP, max_pixels=photo.shape[0] * photo.shape[1] - 1)
    assert error_code(limited.errors[0]) == "too_large"
    assert prepare_images(pa.array([data]), PREP, max_pixels=photo.shape[0] * photo.shape[1]).errors == [None]


def test_byte_limit_holds_for_bytes_cells_and_files(photo, tmp_path, monkeypatch):
    """One encoded image past ``max_bytes`` is a too_large row, whether a bytes cell or a file,
    and a file is read no further than the limit (plus the one byte that proves it is over)."""
    import encoders.core.files as files

    data = encode(photo, "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    reads = []
    real_open = files.open_input

    @contextlib.contextmanager
    def counting_open(value):
        with real_open(value) as handle:
            real_read = handle.read
            handle = types.SimpleNamespace(read=lambda n=-1: reads.append(n) or real_read(n))
            yield handle

    monkeypatch.setattr(files, "open_input", counting_open)
    for value in (data, str(path)):
        over = prepare_images(pa.array([value]), PREP, max_bytes=len(data) - 1)
        assert error_code(over.errors[0]) == "too_large" and over.values[0].as_py() is None
        assert prepare_images(pa.array([value]), PREP, max_bytes=len(data)).errors == [None]
    assert reads == [len(data), len(data) + 1]  # the file was read twice, each time with a limit


def test_sixteen_bit_rgb_png_through_torchvision(photo):
    """A 48-bit RGB PNG: torchvision decodes it to uint16, which is shifted down to the high byte."""
    import struct
    import zlib

    h, w = 8, 5
    wide = (photo[:h, :w].astype(np.uint16) << 8) | 0x80
    raw = b"".join(b"\x00" + wide[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    assert np.array_equal(as_hwc(decode_rgb(png)), photo[:h, :w])


def test_wrong_type_is_bad_type():
    assert error_code(prepare_images(pa.array([1, 2]), PREP).errors[0]) == "bad_type"


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "declares no image preprocessing"),
        ({"resize": 64, "crop": 56, "mean": [0.5] * 3}, "missing 'std'"),
        ({"resize": 64, "crop": 80, "mean": 0.5, "std": 0.5}, "crop must be between 1 and resize"),
        ({"resize": 64, "crop": 56, "mean": [0.5, 0.5], "std": 0.5}, "expected 3 numbers"),
        ({"resize": 64, "crop": 56, "mean": 0.5, "std": 0.5, "interpolation": "lanczos"}, "valid values: bilinear"),
        ({"resize": 64, "crop": 56, "mean": 0.5, "std": 0.5, "size": 3}, "unknown key 'size'"),
    ],
)
def test_preprocessing_is_validated(raw, message):
    with pytest.raises(ValueError, match=message):
        ImagePreprocess.from_options({"preprocessing": raw})


def test_an_elongated_image_gets_a_vector_in_bounded_memory(tmp_path):
    """A 1 x 200000 PNG is a few hundred bytes and passes max_pixels; resizing its short side to
    256 would build a ~39 GB tensor. In a process of its own: a valid row, and little memory."""
    import subprocess
    import sys

    Image.new("RGB", (200_000, 1), (200, 30, 30)).save(tmp_path / "strip.png")
    code = (
        "import pyarrow as pa\n"
        "from encoders.image.prepare import ImagePreprocess, prepare_images\n"
        "prep = ImagePreprocess(resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)\n"
        f"out = prepare_images(pa.array([{str(tmp_path / 'strip.png')!r}]), prep)\n"
        "assert out.errors == [None], out.errors\n"
        "assert len(out.values[0].as_py()) == 3 * 224 * 224\n"
        # VmHWM: this process's own peak (ru_maxrss would carry the forking pytest's across exec)
        "print([int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 1500  # MB: torch and Pillow alone are most of it


def test_the_bounded_path_matches_the_exact_one_where_both_run(photo, monkeypatch):
    from encoders.image import prepare

    prep = ImagePreprocess(resize=64, crop=48, mean=(0.5,) * 3, std=(0.5,) * 3)
    image = decode_rgb(encode(photo, "PNG"))
    exact = resize_crop(image, prep).float()
    monkeypatch.setattr(prepare, "MAX_RESIZED_PIXELS", 0)  # the crop-first path on an ordinary photo
    bounded = resize_crop(image, prep).float()
    assert bounded.shape == exact.shape == (3, 48, 48)
    # The same picture, up to resampling at the box's edge (uint8 levels, mean over pixels).
    assert (bounded - exact).abs().mean() < 6


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_input_is_torchvisions_normalize_in_either_layout(photo, channels_last):
    """The actor's uint8 -> float step equals torchvision's to_dtype(scale) + normalize on the
    same crops, laid out as the encoder asked."""
    import torchvision.transforms.v2.functional as F

    from encoders.image.tensors import to_model_input

    crops = torch.stack([resize_crop(torch.from_numpy(photo).permute(2, 0, 1), PREP)] * 2)
    crops[1] = 255 - crops[1]
    expected = F.normalize(F.to_dtype(crops, torch.float32, scale=True), list(PREP.mean), list(PREP.std))
    got = to_model_input(crops, PREP, torch.device("cpu"), channels_last)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
