"""The prepare half and the extra column that every image family shares."""

from __future__ import annotations

import pyarrow as pa

from encoders.core.spec import EncoderFamily, EncoderSpec, ExtraColumn, Prepared
from encoders.image.prepare import ImagePreprocess, prepare_images
from encoders.image.tensors import patch_columns


class ImageFamily(EncoderFamily):
    """Images decode, orient, resize and crop to uint8 CHW in CPU tasks, by the model's declared
    ``preprocessing``; ``pooling: patches`` adds ``<output>_patches``."""

    modalities: tuple[str, ...] = ("image",)

    def prepare(self, spec: EncoderSpec, modality: str, values: pa.Array) -> Prepared:
        opts = spec.options
        return prepare_images(values, ImagePreprocess.from_options(opts), opts["max_pixels"], opts["max_bytes"])

    def extra_columns(self, spec: EncoderSpec, modality: str) -> tuple[ExtraColumn, ...]:
        return patch_columns(spec.options) if modality == "image" else ()

    def prepared_bytes(self, spec: EncoderSpec, modality: str) -> int:
        crop = ImagePreprocess.from_options(spec.options).crop if modality == "image" else 0
        return 3 * crop * crop  # uint8 CHW
