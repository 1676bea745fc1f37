"""Pre- and post-processing: uploads -> pixels; a worker's images (files it encoded, or pixels) -> PIL images
-> encoded bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from engine.errors import InvalidRequestError
from workers.data import EncodedImage, WorkerImage
from workers.runtime.encoding import PILLOW_FORMATS, encode_pixels

# Each output_format (OpenAI's names; PILLOW_FORMATS names the writer of each) and the media type it is served with.
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Uploads are opened with these decoders only: what OpenAI accepts, and less of Pillow exposed to strangers.
UPLOAD_FORMATS = ["PNG", "JPEG", "WEBP"]


def to_pil(image: WorkerImage) -> Image.Image:
    """A worker's image as a PIL image. A file the worker encoded is only opened (its header read): its pixels
    are decoded when someone first reads them (decoding a 1024x1024 PNG takes 9-24 ms on a CPU here)."""
    if isinstance(image, EncodedImage):
        return Image.open(io.BytesIO(image.data), formats=[PILLOW_FORMATS[image.format]])
    return Image.fromarray(image)


def encode_image(image: Image.Image, output_format: str = "png", compression: int | None = None) -> bytes:
    """Encode as png/jpeg/webp, as workers do (workers.runtime.encoding.encode_pixels), for images a worker sent
    as pixels (older workers, custom executors)."""
    return encode_pixels(np.asarray(image.convert("RGB")), output_format, compression).data


def encoded_as(image: EncodedImage | None, output_format: str, compression: int | None) -> bytes | None:
    """The bytes of ``image`` when the worker encoded it as asked (None: encode it here)."""
    if image is None or image.format != output_format:
        return None
    if output_format != "png" and image.compression != compression:
        return None
    return image.data


def decode_upload(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """An uploaded PNG/JPEG/WebP as a loaded, upright PIL image; InvalidRequestError naming ``param`` otherwise.

    The pixel count is checked from the header, before anything is decompressed, so a
    decompression bomb costs a few bytes of reading.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError as error:
        raise InvalidRequestError(f"{param} has too many pixels: {error}", param=param) from error
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for hostile bytes; all mean "not an image"
        raise InvalidRequestError(
            f"{param} could not be read as an image; send a PNG, JPEG or WebP file", param=param, code="invalid_image"
        ) from error
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequestError(
            f"{param} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", param=param
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - truncated or corrupt data, whatever the decoder raised
        raise InvalidRequestError(
            f"{param} is truncated or corrupt: {error}", param=param, code="invalid_image"
        ) from error


def rgb_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def mask_pixels(image: Image.Image, param: str = "mask") -> np.ndarray:
    """OpenAI's mask (fully transparent pixels mark the area to edit) as diffusers' (255 = repaint)."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise InvalidRequestError(
            f"{param} has no alpha channel; its fully transparent pixels mark the area to edit", param=param
        )
    alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
    return np.where(alpha == 0, 255, 0).astype(np.uint8)


def resize_pixels(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``pixels`` (HxWx3 image or HxW mask) at width x height; the same array when it already is."""
    if pixels.shape[:2] == (height, width):
        return pixels
    # A mask stays binary: nearest neighbour, not a filter that blends its edge.
    resample = Image.Resampling.NEAREST if pixels.ndim == 2 else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(pixels).resize((width, height), resample))
