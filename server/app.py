"""The FastAPI app: OpenAI-compatible routes over an AsyncDiffusionEngine."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from engine import (
    AsyncDiffusionEngine,
    DiffusionEngine,
    DiffusionOutput,
    EngineDeadError,
    EngineError,
    GenerationFailedError,
    InvalidRequestError,
    NotFoundError,
    OmniDiffusionRequest,
    PartialImages,
    Usage,
    parse_size,
    steps_for_quality,
)
from engine import metrics
from engine.images import decode_upload, encode_image, mask_pixels, rgb_pixels
from server.errors import engine_error_event, engine_error_response, install_error_handlers
from server.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, RequestLogMiddleware
from server.protocol import (
    CompletedEvent,
    ErrorResponse,
    ImageData,
    ImageEditForm,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageOptions,
    ImageReference,
    ImagesResponse,
    ImageUsage,
    ImageVariationForm,
    ImageVariationRequest,
    ModelCard,
    ModelList,
    PartialImageEvent,
    TokenDetails,
)
from server.storage import ImageStore

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# What the response reports for a requested quality (OpenAI answers with one of its current names).
_EFFECTIVE_QUALITY = {"auto": "medium", "standard": "medium", "hd": "high"}
_ERROR_RESPONSES: dict = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request (names the param)",
        401: "missing or wrong API key",
        404: "no such model or image file",
        429: "queue full; retry after Retry-After",
        500: "the pipeline failed (x-should-retry: false)",
        503: "no worker can serve, or the server is draining",
        504: "a worker did not answer in time",
    }.items()
}
_FILE_FIELDS = ("image", "mask")


def create_app(engine: DiffusionEngine) -> FastAPI:
    """An app serving ``engine``. The caller owns the engine; the app owns its batching front and image store."""
    config = engine.od_config
    model_name = config.model_name
    created = int(time.time())
    store = ImageStore(config.image_storage_dir, config.image_ttl_s)
    logged_unknown_fields: set[str] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = AsyncDiffusionEngine(engine)
        app.state.engine.start()
        yield
        await app.state.engine.close()
        store.close()

    app = FastAPI(title="imagegen", summary="OpenAI-compatible image generation", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_keys=config.api_key, protect_metrics=config.metrics_require_api_key)
    app.add_middleware(RequestLogMiddleware, model_name=model_name)

    # -- the shared path of every image route ----------------------------------------------------
    def check_options(body: ImageOptions, route: str) -> None:
        if body.model is not None and body.model != model_name:
            raise InvalidRequestError(
                f"The model '{body.model}' does not exist; this server serves '{model_name}'.",
                param="model",
                code="model_not_found",
            )
        if getattr(body, "background", None) == "transparent":
            raise InvalidRequestError(
                f"background 'transparent' is not supported by the model '{model_name}': its pipeline makes "
                "opaque RGB images. Use 'opaque' or 'auto'.",
                param="background",
            )
        # Clients send vendor fields we do not know; say so once per field, not once per request.
        for name in (body.model_extra or {}).keys() - logged_unknown_fields:
            logged_unknown_fields.add(name)
            logger.warning("ignoring unknown field '%s' (first sent to %s); not logged again", name, route)

    def request_fields(body: ImageOptions) -> dict:
        """OmniDiffusionRequest fields from the options every route shares."""
        width, height = _parse_request_size(body.size)
        steps = body.num_inference_steps
        quality = getattr(body, "quality", None)
        if steps is None and quality is not None:
            steps = steps_for_quality(quality, config)
        # Partial images only mean something in a stream; variations have neither.
        streamed_partials = (getattr(body, "partial_images", None) or 0) if getattr(body, "stream", False) else 0
        return {
            "width": width,
            "height": height,
            "negative_prompt": body.negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": body.guidance_scale,
            "seed": tuple(body.seed) if isinstance(body.seed, list) else body.seed,
            "num_images": body.n,
            "partial_images": streamed_partials,
            "cache": body.cache,
        }

    async def answer(http_request: Request, body: ImageOptions, request: OmniDiffusionRequest, events: str | None):
        """Generate ``request`` and answer as ``body`` asks: JSON with b64_json or urls, or (``events`` names
        the event prefix) a server-sent event stream."""
        # Prepared here, in a thread: resizing an uploaded image must not block the event loop.
        prepared = await asyncio.to_thread(engine.prepare, request)
        size = f"{prepared.width}x{prepared.height}"
        quality = getattr(body, "quality", None)
        quality = _EFFECTIVE_QUALITY.get(quality, quality)

        def encode(image) -> bytes:
            started = time.perf_counter()
            data = encode_image(image, body.output_format, body.output_compression)
            metrics.STAGE_TIME.labels(model_name, "image_encode").observe(time.perf_counter() - started)
            return data

        if events is not None and getattr(body, "stream", False):
            event_fields = {"output_format": body.output_format, "quality": quality or "medium", "size": size}
            items = app.state.engine.stream(prepared)
            # Nothing is sent before the first item, so a request that fails at once (queue full, timed
            # out, pipeline error) gets its status code, as without stream.
            first = await _cancel_on_disconnect(http_request, anext(items))
            if isinstance(first, DiffusionOutput):
                await items.aclose()  # the output is its last item
                finished(http_request, first)
            stream = server_sent_events(http_request, first, items, partial(_events, events, encode, event_fields))
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        output = await _cancel_on_disconnect(http_request, app.state.engine.generate(prepared))
        finished(http_request, output)
        encoded = await asyncio.to_thread(lambda: [encode(image) for image in output.images])
        if (body.response_format or config.default_response_format) == "url":
            base_url = (config.public_base_url or str(http_request.base_url)).rstrip("/")
            file_ids = await asyncio.to_thread(lambda: [store.save(data, body.output_format) for data in encoded])
            data = [
                ImageData(url=f"{base_url}/v1/images/files/{file_id}", seed=seed)
                for file_id, seed in zip(file_ids, output.seeds)
            ]
        else:
            data = [
                ImageData(b64_json=base64.b64encode(item).decode(), seed=seed)
                for item, seed in zip(encoded, output.seeds)
            ]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            size=size,
            output_format=body.output_format,
            quality=quality,
            background="opaque",
            usage=_usage(output.usage, len(output.images), output.usage.output_image_tokens),
        )

    def finished(http_request: Request, output: DiffusionOutput) -> None:
        """Note what the generation took (for the request's log line); raise its error."""
        http_request.state.generation = {
            "images": len(output.images),
            "queue_time_s": round(output.queue_time_s, 4),
            "inference_time_s": round(output.inference_time_s, 4),
        }
        if output.error is not None:
            raise GenerationFailedError(output.error)

    async def server_sent_events(
        http_request: Request,
        item: PartialImages | DiffusionOutput,
        items: AsyncIterator[PartialImages | DiffusionOutput],
        events: Callable[[PartialImages | DiffusionOutput], list[str]],
    ) -> AsyncIterator[str]:
        """The events of each partial image as soon as it comes, then the completed events; an error
        after the first event can only be told in an error event."""
        try:
            while isinstance(item, PartialImages):
                yield "".join(await asyncio.to_thread(events, item))
                item = await anext(items)
                if isinstance(item, DiffusionOutput):
                    finished(http_request, item)
            yield "".join(await asyncio.to_thread(events, item))
        except EngineError as error:
            yield _server_sent_event(engine_error_event(error))
        finally:
            await items.aclose()  # when the client left: cancels the request

    async def read_pixels(sources: list[bytes], param: str, to_pixels: Callable[..., np.ndarray]) -> np.ndarray:
        """Exactly one uploaded image, decoded and turned into pixels off the event loop."""
        if not sources:
            raise InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
        if len(sources) > 1:
            raise InvalidRequestError(
                f"{len(sources)} images were sent; the model '{model_name}' edits one image per request.", param=param
            )
        return await asyncio.to_thread(
            lambda: to_pixels(decode_upload(sources[0], param, config.max_upload_image_pixels))
        )

    async def read_body(http_request: Request, model: type[M]) -> tuple[M, dict[str, list[bytes]]]:
        """The body as ``model`` from JSON or a multipart form, and the uploaded files (``image``, ``mask``)."""
        content_type = http_request.headers.get("content-type", "")
        uploads: dict[str, list[bytes]] = {}
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            form = await http_request.form()
            fields: dict = {}
            for key, value in form.multi_items():
                name = key.removesuffix("[]")  # the SDK sends arrays as image[] and seed[]
                if isinstance(value, UploadFile):
                    uploads.setdefault(name, []).append(await _read_upload(value, name, config.max_upload_image_bytes))
                elif name in _FILE_FIELDS:
                    raise InvalidRequestError(f"'{name}' must be a file upload.", param=name)
                elif key.endswith("[]"):
                    fields.setdefault(name, []).append(value)
                else:
                    fields[name] = value
            # Files under other names are vendor fields too: accepted, logged, ignored.
            fields.update({name: "<file>" for name in uploads if name not in _FILE_FIELDS})
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

    def json_images(references: list[ImageReference]) -> list[bytes]:
        return [
            _data_url_bytes(reference, f"images[{index}].image_url", config.max_upload_image_bytes)
            for index, reference in enumerate(references)
        ]

    # -- routes ------------------------------------------------------------------------------------
    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/event-stream": {}}}, **_ERROR_RESPONSES},
    )
    async def create_image(body: ImageGenerationRequest, http_request: Request):
        check_options(body, "/v1/images/generations")
        request = OmniDiffusionRequest(prompt=body.prompt, **request_fields(body))
        return await answer(http_request, body, request, "image_generation")

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/event-stream": {}}}, **_ERROR_RESPONSES},
        openapi_extra=_request_body(ImageEditRequest, ImageEditForm),
    )
    async def edit_image(http_request: Request):
        """Image-to-image; inpainting when a mask is given (its fully transparent pixels are repainted)."""
        body, uploads = await read_body(http_request, ImageEditRequest)
        check_options(body, "/v1/images/edits")
        image = await read_pixels(uploads.get("image", []) + json_images(body.images), "image", rgb_pixels)
        masks = uploads.get("mask", [])
        if body.mask is not None:
            masks.append(_data_url_bytes(body.mask, "mask.image_url", config.max_upload_image_bytes))
        mask = await read_pixels(masks, "mask", mask_pixels) if masks else None
        request = OmniDiffusionRequest(
            prompt=body.prompt,
            image=image,
            mask=mask,
            strength=body.strength,
            **request_fields(body),
        )
        return await answer(http_request, body, request, "image_edit")

    @app.post(
        "/v1/images/variations",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        responses=_ERROR_RESPONSES,
        openapi_extra=_request_body(ImageVariationRequest, ImageVariationForm),
    )
    async def create_variation(http_request: Request):
        """Image-to-image from the image alone (an empty prompt)."""
        body, uploads = await read_body(http_request, ImageVariationRequest)
        check_options(body, "/v1/images/variations")
        image = await read_pixels(uploads.get("image", []) + json_images(body.images), "image", rgb_pixels)
        request = OmniDiffusionRequest(prompt="", image=image, strength=body.strength, **request_fields(body))
        return await answer(http_request, body, request, None)

    @app.get("/v1/images/files/{file_id}", responses={200: {"content": {"image/png": {}}}, **_ERROR_RESPONSES})
    async def image_file(file_id: str) -> Response:
        """An image answered as a url: no API key needed (the id is the secret), 404 once expired."""
        content, media_type = await asyncio.to_thread(store.read, file_id)
        return Response(content, media_type=media_type)

    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created, levers=engine.model_info.get("levers"))])

    # :path, because hub ids such as "org/model" hold a slash.
    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERROR_RESPONSES)
    async def retrieve_model(model_id: str) -> ModelCard:
        if model_id != model_name:
            raise NotFoundError(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return ModelCard(id=model_name, created=created, levers=engine.model_info.get("levers"))

    @app.get("/health")
    async def health() -> JSONResponse:
        """Liveness: 503 only when the engine cannot serve any more."""
        try:
            engine.check_health()
        except EngineError as error:
            return engine_error_response(error)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: 503 while a worker restarts or the server drains."""
        if app.state.engine.draining:
            return engine_error_response(EngineDeadError("the server is shutting down"))
        if not engine.is_ready():
            return engine_error_response(EngineDeadError("a worker is starting or restarting"))
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    _add_schemas(app, ImageEditRequest, ImageVariationRequest)
    return app


def _events(
    prefix: str, encode: Callable[..., bytes], fields: dict, item: PartialImages | DiffusionOutput
) -> list[str]:
    """The server-sent events of one item of a stream: a partial_image event per image of a
    PartialImages, or a completed event per image of the DiffusionOutput."""
    fields = {**fields, "created_at": int(time.time())}
    if isinstance(item, PartialImages):
        events: list[BaseModel] = [
            PartialImageEvent(
                type=f"{prefix}.partial_image",
                b64_json=base64.b64encode(encode(image)).decode(),
                partial_image_index=item.index,
                **fields,
            )
            for image in item.images
        ]
    else:
        per_image_tokens = item.usage.output_image_tokens // max(1, len(item.images))
        events = [
            CompletedEvent(
                type=f"{prefix}.completed",
                b64_json=base64.b64encode(encode(image)).decode(),
                usage=_usage(item.usage, 1, per_image_tokens),
                seed=seed,
                **fields,
            )
            for image, seed in zip(item.images, item.seeds)
        ]
    return [_server_sent_event(event) for event in events]


def _server_sent_event(event: BaseModel) -> str:
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


def _usage(usage: Usage, images: int, output_image_tokens: int) -> ImageUsage:
    input_tokens = usage.text_tokens + usage.input_image_tokens
    return ImageUsage(
        input_tokens=input_tokens,
        input_tokens_details=TokenDetails(image_tokens=usage.input_image_tokens, text_tokens=usage.text_tokens),
        output_tokens=output_image_tokens,
        output_tokens_details=TokenDetails(image_tokens=output_image_tokens, text_tokens=0),
        total_tokens=input_tokens + output_image_tokens,
        images=images,
    )


async def _read_upload(upload: UploadFile, param: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise InvalidRequestError(
            f"{param} is {upload.size} bytes; the limit is {max_bytes}", param=param, code="image_too_large"
        )
    return await upload.read()


def _data_url_bytes(reference: ImageReference, param: str, max_bytes: int) -> bytes:
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


def _request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict:
    """OpenAPI requestBody of a route that reads JSON or a multipart form itself."""

    def schema(model: type[BaseModel]) -> dict:
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        found.pop("$defs", None)  # added to components by _add_schemas
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


def _add_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put the nested models of hand-written request bodies into the OpenAPI components."""
    extra = {}
    for model in models:
        extra.update(model.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}))
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(extra)
        return schema

    app.openapi = openapi


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (a queued request then never runs)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        # The body has been read, so the next message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    finally:
        watcher.cancel()


def _parse_request_size(size: str | None) -> tuple[int | None, int | None]:
    """None or 'auto' leave the choice to the engine (the model's native size, or an input image's)."""
    if size is None or size == "auto":
        return None, None
    try:
        return parse_size(size)
    except ValueError as error:
        raise InvalidRequestError(str(error), param="size") from error
