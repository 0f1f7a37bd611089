"""Image decode and preprocessing for the CPU prepare stage: bytes or a path -> uint8 CHW.

Decode rules (README "Images"):
- JPEG, PNG and WebP whose header says 8-bit RGB, RGBA, L or LA decode with torchvision.io;
  everything else (BMP, GIF, TIFF, CMYK, palette, 16-bit, animated) decodes with Pillow.
- EXIF orientation is applied; animated images give their first frame.
- Grayscale, CMYK and palette images become RGB. 16-bit samples are shifted down 8 bits (Pillow's
  ``convert`` would saturate them). Alpha is composited on white.
- The pixel count is checked from the header, before decoding: past ``max_pixels`` the row is a
  ``too_large`` error (a decompression bomb never gets decoded). Pillow's own bomb limit
  (2 x ``PIL.Image.MAX_IMAGE_PIXELS``, about 179 MP) applies too and gives the same error.
- Resize (shorter side to ``resize``) and center crop (``crop``) come from the model's declared
  preprocessing, never from constants here. The result ships as ``crop*crop*3`` bytes, CHW.

Normalization and the float conversion happen on the encoder's device (encoders/image/tensors.py).
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from encoders.core.errors import error_value
from encoders.core.files import RowError as ImageError  # shared with audio
from encoders.core.files import read_bytes as _read
from encoders.core.spec import Prepared

# Past this many pixels after the resize, only the centre crop is resized (bounded memory).
MAX_RESIZED_PIXELS = 64_000_000
IMAGE_TYPE = pa.binary()  # per row: uint8 CHW bytes, shape (3, crop, crop) from the spec
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_MAX_PIXELS = 100_000_000
# One encoded image (a file, a bytes cell, a tar member) is read into memory whole: past this
# it is a too_large row, and a file is never read further.
DEFAULT_MAX_BYTES = 512 * 2**20
# Every image family's input limits: option name -> (type, default).
IMAGE_INPUT_OPTIONS: dict[str, tuple[type, Any]] = {
    "preprocessing": (dict, None),
    "max_pixels": (int, DEFAULT_MAX_PIXELS),
    "max_bytes": (int, DEFAULT_MAX_BYTES),
}
_TORCHVISION_FORMATS = ("JPEG", "PNG", "WEBP")
_TORCHVISION_MODES = ("RGB", "RGBA", "L", "LA")


@dataclass(frozen=True)
class ImagePreprocess:
    """A model's input preprocessing, as declared data. ``mean`` and ``std`` are in 0..1 units
    (as in Hugging Face processor configs): the encoder computes ``(x / 255 - mean) / std``."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    keep_aspect: bool = True  # False: resize to resize x resize (ViT's processor), then crop

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str = "preprocessing") -> "ImagePreprocess":
        raw = options.get("preprocessing")
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: the model declares no image preprocessing (resize, crop, mean, std)")
        missing = [k for k in ("resize", "crop", "mean", "std") if k not in raw]
        if missing:
            raise ValueError(f"{where}: missing {missing[0]!r}; give resize, crop, mean, std (and interpolation)")
        unknown = sorted(set(raw) - {"resize", "crop", "mean", "std", "interpolation", "keep_aspect"})
        if unknown:
            raise ValueError(
                f"{where}: unknown key {unknown[0]!r}; valid keys: resize, crop, mean, std, interpolation, keep_aspect"
            )
        prep = cls(
            int(raw["resize"]),
            int(raw["crop"]),
            _triple(raw["mean"], "mean", where),
            _triple(raw["std"], "std", where),
            str(raw.get("interpolation", "bilinear")),
            bool(raw.get("keep_aspect", True)),
        )
        if prep.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"{where}.interpolation: {prep.interpolation!r} is not valid; valid values: {', '.join(INTERPOLATIONS)}"
            )
        if not 0 < prep.crop <= prep.resize:
            raise ValueError(f"{where}: crop must be between 1 and resize ({prep.resize}), got {prep.crop}")
        if any(s <= 0 for s in prep.std):
            raise ValueError(f"{where}.std: values must be > 0")
        return prep

    def as_dict(self) -> dict[str, Any]:
        """The ``preprocessing`` option as plain JSON data (lists, not tuples)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def preprocessing_from_processor(folder: str, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """The ``preprocessing`` data of a folder's Hugging Face image processor (ViT, BiT/DINOv2,
    CLIP, ...), or None when the folder has none. The values are the processor's effective ones
    (``AutoImageProcessor`` with the PIL backend, whose resampling is the reference), class defaults
    included: a CLIP config without ``do_center_crop`` still crops, as CLIP's processor does."""
    from pathlib import Path

    if not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(folder, backend="pil", trust_remote_code=trust_remote_code)
    size = _size(getattr(proc, "size", None))
    if "shortest_edge" in size:
        resize, keep_aspect = int(size["shortest_edge"]), True
    elif "height" in size and size.get("height") == size.get("width"):
        resize, keep_aspect = int(size["height"]), False
    else:
        raise ValueError(f"image processor: size {size!r} is not supported (shortest_edge, or square height/width)")
    crop = resize
    if getattr(proc, "do_center_crop", False):
        crop = int(_size(getattr(proc, "crop_size", None)).get("height", resize))
    factor = float(getattr(proc, "rescale_factor", 1 / 255))
    if getattr(proc, "do_rescale", True) is False or abs(factor - 1 / 255) > 1e-9:
        raise ValueError("image processor: only rescale_factor 1/255 is supported")
    resample = _PIL_RESAMPLE.get(int(getattr(proc, "resample", 2)), "?")
    if resample not in INTERPOLATIONS:
        raise ValueError(
            f"image processor: resample {resample!r} has no tensor equivalent here; set preprocessing.interpolation "
            f"to one of {', '.join(INTERPOLATIONS)} to approximate it"
        )
    normalize = getattr(proc, "do_normalize", True)
    return {
        "resize": resize,
        "crop": crop,
        "keep_aspect": keep_aspect,
        "interpolation": resample,
        "mean": [float(v) for v in proc.image_mean] if normalize else [0.0] * 3,
        "std": [float(v) for v in proc.image_std] if normalize else [1.0] * 3,
    }


def _size(value: Any) -> dict[str, int]:
    """A processor's size (a ``SizeDict``, a dict or an int) as a plain dict of the set keys."""
    if value is None:
        return {}
    if isinstance(value, int):
        return {"shortest_edge": value, "height": value}
    if dataclasses.is_dataclass(value):  # transformers' SizeDict
        value = dataclasses.asdict(value)
    return {k: int(v) for k, v in dict(value).items() if v is not None}


def _triple(value: Any, name: str, where: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{where}.{name}: expected 3 numbers (R, G, B), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def prepare_images(
    values: pa.Array, prep: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> Prepared:
    """Paths/URIs (str) or encoded bytes -> per row uint8 CHW bytes (null when absent or bad)
    and error values."""
    out: list[bytes | None] = [None] * len(values)
    errors: list[str | None] = [None] * len(values)
    for i, value in enumerate(values.to_pylist()):
        if value is None:
            continue
        try:
            data = _read(value, max_bytes)
            chw = decode_rgb(data, max_pixels)
            out[i] = resize_crop(chw, prep).numpy().tobytes()
        except ImageError as exc:
            errors[i] = error_value(exc.code, str(exc))
    return Prepared(pa.array(out, type=IMAGE_TYPE), errors)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded image -> (3, h, w) uint8 RGB, by the decode rules in this module's docstring."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            header = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except UnidentifiedImageError:
        raise ImageError("decode_failed", "not an image in a format Pillow or torchvision reads") from None
    except Image.DecompressionBombError as exc:  # Pillow's own limit (2 x MAX_IMAGE_PIXELS) also holds
        raise ImageError("too_large", str(exc).splitlines()[0][:200]) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("decode_failed", str(exc).splitlines()[0][:200] or type(exc).__name__) from None
    width, height = header.size
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} pixels, limit max_pixels={max_pixels}")
    animated = getattr(header, "n_frames", 1) > 1
    if header.format in _TORCHVISION_FORMATS and header.mode in _TORCHVISION_MODES and not animated:
        try:
            return _decode_torchvision(data)
        except RuntimeError:
            pass  # a truncated or odd file: Pillow decides, and gives the error message
    return _decode_pillow(header)


def _decode_torchvision(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    image = decode_image(encoded, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)  # (c, h, w)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return _to_rgb(image)


def _to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(1|2|3|4, h, w) uint8 gray, gray+alpha, RGB, RGBA -> (3, h, w) uint8 RGB on white. An
    RGB image keeps the decoder's (h, w, 3) memory: ``resize_crop`` reads it as it is."""
    channels = image.shape[0]
    if channels in (2, 4):
        color, alpha = image[:-1].float(), image[-1:].float() / 255.0
        image = (color * alpha + 255.0 * (1.0 - alpha)).round().to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1).contiguous()
    return image


def _decode_pillow(image: Any) -> torch.Tensor:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            array = _pillow_to_array(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError("decode_failed", str(exc).splitlines()[0][:200] or type(exc).__name__) from None
    # Pillow's buffers are read-only: a copy only then, in (h, w, c) memory as the decoders give.
    return _to_rgb(torch.from_numpy(np.require(array, requirements=("C", "W"))).permute(2, 0, 1))


def _pillow_to_array(image: Any) -> np.ndarray:
    """A loaded Pillow image -> (h, w, 1|2|3|4) uint8."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        wide = np.asarray(image)
        if mode == "I" and wide.max(initial=0) <= 255:  # 8-bit data stored as int32
            return wide.astype(np.uint8)[..., None]
        # 16-bit samples: keep the high byte, as convert("L") would saturate instead.
        return (np.clip(wide, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)[..., None]
    if mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        image = image.convert("RGB")
    elif mode == "La":
        image = image.convert("LA")
    elif mode in ("RGBa", "RGBX"):
        image = image.convert("RGBA" if mode == "RGBa" else "RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8:
        array = (array.astype(np.uint32) >> 8).astype(np.uint8)
    return array


def resize_crop(image: torch.Tensor, prep: ImagePreprocess) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, crop, crop) uint8: shorter side to ``resize``, then center crop."""
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    mode = InterpolationMode(prep.interpolation)
    # Bilinear and bicubic read (h, w, 3) memory, as the decoders give it, about twice as fast
    # as (3, h, w), with equal bytes out (torch's uint8 kernels); nearest is the other way round.
    if mode == InterpolationMode.NEAREST:
        image = image.contiguous()
    height, width = image.shape[-2:]
    scale = prep.resize / min(height, width)
    if prep.keep_aspect and height * width * scale * scale > MAX_RESIZED_PIXELS:
        # An elongated image (1 x 200000 px is a few hundred bytes and passes max_pixels) would
        # resize to a tensor of tens of GB. Crop the centre box in source coordinates and resize
        # only that: memory bounded by the crop (vectors may differ slightly from the exact path).
        box_h, box_w = min(height, math.ceil(prep.crop / scale)), min(width, math.ceil(prep.crop / scale))
        top, left = (height - box_h) // 2, (width - box_w) // 2
        return F.resized_crop(
            image, top, left, box_h, box_w, [prep.crop, prep.crop], interpolation=mode, antialias=True
        ).contiguous()
    size = [prep.resize] if prep.keep_aspect else [prep.resize, prep.resize]
    image = F.resize(image, size, interpolation=mode, antialias=True)
    return F.center_crop(image, [prep.crop, prep.crop]).contiguous()


def resolve_image_options(opts: dict[str, Any], declared: Mapping[str, Any] | None) -> None:
    """An image family's ``preprocessing`` (the user's, else what the model declares) checked and
    stored as plain data, and ``max_pixels`` and ``max_bytes`` checked."""
    if opts["preprocessing"] is None:
        opts["preprocessing"] = declared
    opts["preprocessing"] = ImagePreprocess.from_options(opts).as_dict()
    for name in ("max_pixels", "max_bytes"):
        if opts.get(name, 1) < 1:
            raise ValueError(f"option {name}: must be >= 1")
