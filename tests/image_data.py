"""Real photos for the image tests (scikit-image and scikit-learn sample images), and the
bad files the decode stage must turn into error values."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

# Distinct real photographs: color and grayscale, several scenes. All ship inside the wheels.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "moon",
    "coins",
    "clock",
)


@functools.lru_cache(maxsize=1)
def real_photos() -> dict[str, np.ndarray]:
    """name -> (h, w, 3) uint8 RGB."""
    import pytest

    data = pytest.importorskip("skimage.data", reason="scikit-image (extra 'dev') not installed")
    photos = {}
    for name in SKIMAGE_PHOTOS:
        image = np.asarray(getattr(data, name)())
        photos[name] = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    try:
        from sklearn.datasets import load_sample_images

        for name, image in zip(("china", "flower"), load_sample_images().images):
            photos[name] = np.asarray(image)
    except ImportError:
        pass
    return photos


def encode(array: np.ndarray, fmt: str = "JPEG", **save) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **save)
    return buffer.getvalue()


def write_bad_files(folder: Path) -> dict[str, str | None]:
    """Bad and edge-case files in ``folder``: file name -> the expected error code (None: valid)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = real_photos()["coffee"]
    jpeg = encode(photo)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "text.jpg").write_text("this is not an image\n")
    # A decompression bomb: a 20000 x 20000 PNG of one color compresses to a few hundred KB.
    Image.new("L", (20_000, 20_000)).save(folder / "bomb.png", optimize=True)
    (folder / "tiny.png").write_bytes(encode(np.full((1, 1, 3), 200, np.uint8), "PNG"))
    (folder / "strip.png").write_bytes(encode(np.tile(photo[:100, :1, :], (1, 10_000 // 1, 1))[:, :10_000], "PNG"))
    return {
        "zero.jpg": "decode_failed",
        "truncated.jpg": "decode_failed",
        "text.jpg": "decode_failed",
        "bomb.png": "too_large",
        "tiny.png": None,
        "strip.png": None,
    }
