"""Post-processing: worker pixels -> PIL images -> encoded bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Pillow's format names and the media types they are served with.
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels)


def encode_image(image: Image.Image, output_format: str = "png", compression: int | None = None) -> bytes:
    """Encode as png/jpeg/webp.

    ``compression`` is OpenAI's output_compression (0-100, default 100) for jpeg/webp; like OpenAI,
    lower numbers give smaller files, so it is Pillow's ``quality``.
    """
    pillow_format, _ = OUTPUT_FORMATS[output_format]
    options: dict = {}
    if output_format in ("jpeg", "webp"):
        options["quality"] = 100 if compression is None else compression
    buffer = io.BytesIO()
    image.save(buffer, format=pillow_format, **options)
    return buffer.getvalue()
