"""POST /v1/images/generations, /v1/images/edits, /v1/images/variations."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from engine import InvalidRequestError, OmniDiffusionRequest
from engine.images import mask_pixels, rgb_pixels
from server.errors import ERROR_RESPONSES
from server.protocol import (
    ImageEditForm,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationForm,
    ImageVariationRequest,
)
from server.routes import serving
from server.serving import ImageServing
from server.uploads import data_url_bytes, json_images, read_body, read_pixels

if TYPE_CHECKING:
    import numpy as np

M = TypeVar("M", bound=ImageEditRequest | ImageVariationRequest)

router = APIRouter()

# Bodies these routes parse themselves: their nested models go into the OpenAPI components (see app.py).
HAND_PARSED_BODIES = (ImageEditRequest, ImageVariationRequest)


def _request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict:
    """OpenAPI requestBody of a route that reads JSON or a multipart form itself."""

    def schema(model: type[BaseModel]) -> dict:
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        found.pop("$defs", None)  # added to components by app.py
        return found

    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema(json_model)},
                "multipart/form-data": {"schema": schema(form_model)},
            },
        }
    }


async def _read_image_body(
    http_request: Request, model: type[M], images: ImageServing, route: str, check_count: Callable[[int], None] | None
) -> tuple[M, dict[str, list[bytes]], tuple[np.ndarray, ...]]:
    """The body of a route that takes input images (JSON or multipart), checked, with the uploaded
    files and the images' pixels; more images than the model (or ``check_count``, the route) takes are
    refused before any is decoded."""
    config = images.config
    body, uploads = await read_body(http_request, model, config.max_upload_image_bytes)
    images.check_options(body, route)
    sources = uploads.get("image", []) + json_images(body.images, config.max_upload_image_bytes)
    (check_count or partial(images.check_image_count, body))(len(sources))
    return body, uploads, await read_pixels(sources, "image", rgb_pixels, config)


def _one_image(count: int) -> None:
    if count > 1:
        raise InvalidRequestError(f"A variation is made from one image; {count} were sent.", param="image")


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
)
async def create_image(body: ImageGenerationRequest, http_request: Request, images: ImageServing = Depends(serving)):
    images.check_options(body, "/v1/images/generations")
    request = partial(OmniDiffusionRequest, prompt=body.prompt)
    return await images.answer(http_request, body, request, "image_generation")


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
    openapi_extra=_request_body(ImageEditRequest, ImageEditForm),
)
async def edit_image(http_request: Request, images: ImageServing = Depends(serving)):
    """Image-to-image; inpainting when a mask is given (its fully transparent pixels are repainted)."""
    body, uploads, pixels = await _read_image_body(http_request, ImageEditRequest, images, "/v1/images/edits", None)
    masks = uploads.get("mask", [])
    if body.mask is not None:
        masks.append(data_url_bytes(body.mask, "mask.image_url", images.config.max_upload_image_bytes))
    if len(masks) > 1:
        raise InvalidRequestError(f"An edit takes one mask; {len(masks)} were sent.", param="mask")
    (mask,) = await read_pixels(masks, "mask", mask_pixels, images.config) if masks else (None,)
    request = partial(
        OmniDiffusionRequest,
        prompt=body.prompt,
        images=pixels,
        mask=mask,
        strength=body.strength,
        input_fidelity=body.input_fidelity,
    )
    return await images.answer(http_request, body, request, "image_edit")


@router.post(
    "/v1/images/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    openapi_extra=_request_body(ImageVariationRequest, ImageVariationForm),
)
async def create_variation(http_request: Request, images: ImageServing = Depends(serving)):
    """Image-to-image from the image alone (an empty prompt)."""
    body, _, pixels = await _read_image_body(
        http_request, ImageVariationRequest, images, "/v1/images/variations", _one_image
    )
    request = partial(OmniDiffusionRequest, prompt="", images=pixels, strength=body.strength)
    return await images.answer(http_request, body, request, None)
