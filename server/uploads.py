"""Bodies that carry images: JSON with data: URLs or a multipart form with files, read into a pydantic
model and pixels (decoding off the event loop; the server fetches nothing from the network)."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from engine import InvalidRequestError, OmniDiffusionConfig
from engine.images import decode_upload
from server.protocol import ImageReference

if TYPE_CHECKING:
    import numpy as np

M = TypeVar("M", bound=BaseModel)

FILE_FIELDS = ("image", "mask")


async def read_body(http_request: Request, model: type[M], max_upload_bytes: int) -> tuple[M, dict[str, list[bytes]]]:
    """The body as ``model`` from JSON or a multipart form, and the uploaded files (``image``, ``mask``)."""
    content_type = http_request.headers.get("content-type", "")
    uploads: dict[str, list[bytes]] = {}
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await http_request.form()
        fields: dict = {}
        for key, value in form.multi_items():
            name = key.removesuffix("[]")  # the SDK sends arrays as image[] and seed[]
            if isinstance(value, UploadFile):
                uploads.setdefault(name, []).append(await _read_upload(value, name, max_upload_bytes))
            elif name in FILE_FIELDS:
                raise InvalidRequestError(f"'{name}' must be a file upload.", param=name)
            elif key.endswith("[]"):
                fields.setdefault(name, []).append(value)
            else:
                fields[name] = value
        # Files under other names are vendor fields too: accepted, logged, ignored.
        fields.update({name: "<file>" for name in uploads if name not in FILE_FIELDS})
    elif content_type.startswith("application/json"):
        try:
            fields = await http_request.json()
        except ValueError:
            raise InvalidRequestError("We could not parse the JSON body of your request.") from None
        if not isinstance(fields, dict):
            raise InvalidRequestError("The JSON body must be an object.")
    else:
        raise InvalidRequestError("Send the body as multipart/form-data or application/json.")
    try:
        body = model.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from error
    return body, uploads


async def read_pixels(
    sources: list[bytes], param: str, to_pixels: Callable[..., np.ndarray], config: OmniDiffusionConfig
) -> tuple[np.ndarray, ...]:
    """Every uploaded image (at least one), decoded and turned into pixels off the event loop, in order.
    The caller has checked how many it may take."""
    if not sources:
        raise InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    pixel_limit = config.max_upload_image_pixels
    return await asyncio.to_thread(
        lambda: tuple(
            to_pixels(decode_upload(source, param if len(sources) == 1 else f"{param}[{index}]", pixel_limit))
            for index, source in enumerate(sources)
        )
    )


def json_images(references: list[ImageReference], max_bytes: int) -> list[bytes]:
    """The bytes of a JSON body's ``images``."""
    return [
        data_url_bytes(reference, f"images[{index}].image_url", max_bytes)
        for index, reference in enumerate(references)
    ]


def data_url_bytes(reference: ImageReference, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:...;base64,...`` URL (the server fetches nothing from the network)."""
    url = reference.image_url
    if url is None:
        raise InvalidRequestError(
            "Send the image as image_url, a base64 data: URL; file_id is not supported.", param=param
        )
    header, comma, payload = url.partition(",")
    if not (header.startswith("data:") and header.endswith(";base64") and comma):
        raise InvalidRequestError("image_url must be a base64 data: URL (data:image/png;base64,...).", param=param)
    if len(payload) // 4 * 3 > max_bytes:
        raise InvalidRequestError(
            f"{param} is larger than the limit of {max_bytes} bytes", param=param, code="image_too_large"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise InvalidRequestError(f"{param} is not valid base64: {error}", param=param) from error


async def _read_upload(upload: UploadFile, param: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise InvalidRequestError(
            f"{param} is {upload.size} bytes; the limit is {max_bytes}", param=param, code="image_too_large"
        )
    return await upload.read()
