"""ImageServing: the one request path every image route shares: validate -> generate -> encode -> answer.

A route parses its own body (JSON or multipart), checks it with ``check_options``, and hands ``answer``
how to make its OmniDiffusionRequest; ``answer`` holds the model the body names (loading it if needed),
fills the options every route shares (``request_fields``) and answers as the body asks: JSON with
b64_json or urls, or a stream of server-sent events.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TypeVar

import pybase64
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from engine import (
    AsyncDiffusionEngine,
    DiffusionEngine,
    DiffusionOutput,
    EngineError,
    GenerationFailedError,
    InvalidRequestError,
    LoraWeight,
    OmniDiffusionRequest,
    PartialImages,
    StepProgress,
    Usage,
    parse_size,
    steps_for_quality,
)
from engine import EncodedImage, metrics
from engine.batcher import QueueRoom
from engine.models import ModelRegistry
from engine.residency import ServedModel
from engine.images import encode_image, encoded_as
from server.errors import engine_error_event
from server.middleware import ClientDisconnected, key_digest
from server.protocol import (
    CompletedEvent,
    ImageData,
    ImageOptions,
    ImagesResponse,
    ImageUsage,
    PartialImageEvent,
    ProgressEvent,
    TokenDetails,
)
from server.storage import ImageStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# While a streaming request with progress waits for its model to load, a loading_model progress event this often.
LOADING_EVENT_INTERVAL_S = 2.0

# What the response reports for a requested quality (OpenAI answers with one of its current names).
_EFFECTIVE_QUALITY = {"auto": "medium", "standard": "medium", "hd": "high"}


class ImageServing:
    """Turns a route's parsed body into generated images and the answer the client asked for.

    Holds what every image route shares: the models (each request holds the one it names while it runs),
    the store of images answered as urls, and which unknown fields have already been logged.
    """

    def __init__(self, models: ModelRegistry, store: ImageStore):
        self.models = models
        self.config = models.server_config
        self.store = store
        self._logged_unknown_fields: set[str] = set()

    # -- 1. validate -------------------------------------------------------------------------------
    def model_of(self, body: ImageOptions) -> ServedModel:
        """The model a request runs on: the one ``model`` names, the base model of the LoRA adapter it names,
        or the first (none named). NotFoundError (404) for a name nobody serves."""
        if body.model is None or body.model in self.models.models:
            return self.models.get(body.model)
        owner = self.models.adapter_owner(body.model)
        if owner is None:
            raise self.models.not_found(body.model)
        return owner

    def check_options(self, body: ImageOptions, route: str) -> None:
        """Refuse what this server cannot do for any request (a model it does not serve, 404; a transparent
        background)."""
        model = self.model_of(body)
        if getattr(body, "background", None) == "transparent":
            raise InvalidRequestError(
                f"background 'transparent' is not supported by the model '{model.name}': its pipeline makes "
                "opaque RGB images. Use 'opaque' or 'auto'.",
                param="background",
            )
        # Clients send vendor fields we do not know; say so once per field, not once per request.
        for name in (body.model_extra or {}).keys() - self._logged_unknown_fields:
            self._logged_unknown_fields.add(name)
            logger.warning("ignoring unknown field '%s' (first sent to %s); not logged again", name, route)

    def check_image_count(self, body: ImageOptions, count: int) -> None:
        """Refuse more input images than the model takes, before any is decoded (a model not loaded yet is
        checked once it is, with the request)."""
        engine = self.model_of(body).engine
        if engine is not None:
            engine.rules.check_image_count(count)

    def _loras(self, body: ImageOptions, engine: DiffusionEngine) -> tuple[LoraWeight, ...]:
        """The LoRA adapters the request runs with: the one ``model`` names (at ``lora_scale``), or ``loras``
        with the base model. NotFoundError for a model not served; InvalidRequestError for both forms at once,
        or a ``lora_scale`` without an adapter as model. The engine checks the names in ``loras``."""
        model_name = engine.od_config.model_name
        if body.model is not None and body.model != model_name:
            adapter = engine.loras.get(body.model).name
            if body.loras:
                raise InvalidRequestError(
                    f"The model '{adapter}' is a LoRA adapter, and loras names adapters too: name them all in "
                    f"loras, with model '{model_name}'",
                    param="loras",
                )
            return (LoraWeight(adapter, body.lora_scale),)
        if body.lora_scale is not None:
            raise InvalidRequestError(
                "lora_scale needs a LoRA adapter: send its name as model (with loras, give each adapter its scale)",
                param="lora_scale",
            )
        return tuple(LoraWeight(lora.name, lora.scale) for lora in body.loras or ())

    def request_fields(self, body: ImageOptions, engine: DiffusionEngine) -> dict:
        """OmniDiffusionRequest fields from the options every route shares, for the model ``engine`` serves."""
        width, height = _parse_request_size(body.size)
        steps = body.num_inference_steps
        quality = getattr(body, "quality", None)
        if steps is None and quality is not None:
            default_steps = engine.defaults["num_inference_steps"].value
            steps = steps_for_quality(quality, default_steps, engine.od_config.max_num_inference_steps)
        # Partial images and progress only mean something in a stream; variations have neither.
        streamed = getattr(body, "stream", False)
        return {
            "width": width,
            "height": height,
            "negative_prompt": body.negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": body.guidance_scale,
            "seed": tuple(body.seed) if isinstance(body.seed, list) else body.seed,
            "num_images": body.n,
            "partial_images": (getattr(body, "partial_images", None) or 0) if streamed else 0,
            "progress": streamed and getattr(body, "progress", False),
            "cache": body.cache,
            "loras": self._loras(body, engine),
            # The worker writes the files (docs/architecture.md, "A request's path").
            "output_format": body.output_format,
            "output_compression": body.output_compression,
        }

    # -- 2. generate, 3. encode, 4. answer ---------------------------------------------------------
    async def answer(
        self,
        http_request: Request,
        body: ImageOptions,
        make_request: Callable[..., OmniDiffusionRequest],
        events: str | None,
    ):
        """Load the model the body names if it is not (see ModelRegistry), make the request from the body's
        options (``make_request(**fields)``), generate it and answer as ``body`` asks: JSON with b64_json or
        urls, or (``events`` names the event prefix) a server-sent event stream. The model is held until the
        answer is complete. The answer, an error's too, carries the sender's share of the queue as OpenAI's
        x-ratelimit-*-requests headers (docs/openai-compatibility.md)."""
        model = self.model_of(body)
        # The request log and the request metrics carry the model (server/middleware.py).
        http_request.state.model_name = model.name
        key = fairness_key(http_request, self.config.fairness_header)
        front: AsyncDiffusionEngine | None = None
        held = False
        try:
            if events is not None and getattr(body, "stream", False) and getattr(body, "progress", False):
                if self.models.needs_load(model):
                    stream = self._events_after_load(http_request, body, make_request, events, key, model)
                    return StreamingResponse(
                        stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
                    )
            front = await self.models.acquire(model)
            held = True
            request = make_request(**self.request_fields(body, front.engine))
            answer = await self._answer(http_request, body, request, events, key, front)
            if isinstance(answer, StreamingResponse):  # held until its last event is sent
                answer.body_iterator = _released_after(answer.body_iterator, partial(self.models.release, model))
                held = False
            return answer
        finally:
            if held:
                self.models.release(model)
            # A model that never loaded for this request: the whole share is free.
            limit = model.config.queued_images_per_key
            room = front.queue_room(key) if front is not None else QueueRoom(limit, limit, 0.0)
            http_request.state.response_headers = {
                "x-ratelimit-limit-requests": str(room.limit),
                "x-ratelimit-remaining-requests": str(room.remaining),
                "x-ratelimit-reset-requests": duration_text(room.reset_s),
            }

    async def _answer(
        self,
        http_request: Request,
        body: ImageOptions,
        request: OmniDiffusionRequest,
        events: str | None,
        key: str,
        front: AsyncDiffusionEngine,
    ):
        engine = front.engine
        prepared = await _prepared(engine, request)
        size = f"{prepared.width}x{prepared.height}"
        quality = _reported_quality(body)
        encode = partial(self._encode, engine.od_config.model_name, body.output_format, body.output_compression)

        if events is not None and getattr(body, "stream", False):
            items = front.stream(prepared, key)
            # Nothing is sent before the first item, so a request that fails at once (queue full, timed
            # out, pipeline error) gets its status code, as without stream.
            first = await _cancel_on_disconnect(http_request, anext(items))
            if isinstance(first, DiffusionOutput):
                await items.aclose()  # the output is its last item
                _finished(http_request, first)
            stream = _server_sent_events(http_request, first, items, self._event_maker(body, prepared, events, engine))
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        output = await _cancel_on_disconnect(http_request, front.generate(prepared, key))
        _finished(http_request, output)
        encoded = await _files(encode, body.output_format, body.output_compression, output)
        if (body.response_format or self.config.default_response_format) == "url":
            base_url = (self.config.public_base_url or str(http_request.base_url)).rstrip("/")
            file_ids = await asyncio.to_thread(lambda: [self.store.save(data, body.output_format) for data in encoded])
            data = [
                ImageData(url=f"{base_url}/v1/images/files/{file_id}", seed=seed)
                for file_id, seed in zip(file_ids, output.seeds)
            ]
        else:
            data = [ImageData(b64_json=_BASE64_PLACEHOLDER, seed=seed) for seed in output.seeds]
        response = ImagesResponse(
            created=int(time.time()),
            data=data,
            size=size,
            output_format=body.output_format,
            quality=quality,
            background="opaque",
            usage=_usage(output.usage, len(output.images), output.usage.output_image_tokens),
        )
        if data and data[0].url is not None:
            return response
        return Response(_json_with_base64(response, encoded), media_type="application/json")

    def _event_maker(
        self, body: ImageOptions, prepared: OmniDiffusionRequest, events: str, engine: DiffusionEngine
    ) -> Callable[[StreamItem], list[str]]:
        """The server-sent events of each item of ``prepared``'s stream (see _events)."""
        fields = {
            "output_format": body.output_format, "quality": _reported_quality(body) or "medium",
            "size": f"{prepared.width}x{prepared.height}",
        }
        encode = partial(self._encode, engine.od_config.model_name, body.output_format, body.output_compression)
        return partial(_events, events, encode, fields)

    async def _events_after_load(
        self,
        http_request: Request,
        body: ImageOptions,
        make_request: Callable[..., OmniDiffusionRequest],
        events: str,
        key: str,
        model: ServedModel,
    ) -> AsyncIterator[str]:
        """The stream of a request (with ``progress``) whose model must load first: a loading_model progress event
        at once (the 200 goes with it) and every LOADING_EVENT_INTERVAL_S while it loads, then the request's own
        events. Any failure after the first event (the load failed, the request does not suit the model, the
        server shuts down) is an error event. The client leaving stops the wait (the load goes on for others)."""
        total_steps = body.num_inference_steps or model.defaults["num_inference_steps"]
        acquiring = asyncio.ensure_future(self.models.acquire(model))
        front: AsyncDiffusionEngine | None = None
        try:
            while not acquiring.done():
                loading = ProgressEvent(
                    type=f"{events}.progress", step=0, total_steps=total_steps, created_at=int(time.time()),
                    stage="loading_model",
                )
                yield _server_sent_event(loading)
                await asyncio.wait({acquiring}, timeout=LOADING_EVENT_INTERVAL_S)
            front = acquiring.result()
            request = make_request(**self.request_fields(body, front.engine))
            prepared = await _prepared(front.engine, request)
            items = front.stream(prepared, key)
            # Starlette ends this stream when the client leaves; _server_sent_events then cancels the request.
            first = await anext(items)
            if isinstance(first, DiffusionOutput):
                await items.aclose()
                _finished(http_request, first)
            async for event in _server_sent_events(
                http_request, first, items, self._event_maker(body, prepared, events, front.engine)
            ):
                yield event
        except EngineError as error:
            yield _server_sent_event(engine_error_event(error))
        finally:
            if front is not None:
                self.models.release(model)
            elif not acquiring.done():
                acquiring.cancel()  # acquire releases the model itself

    def _encode(
        self, model_name: str, output_format: str, compression: int | None, image, worker_file: EncodedImage | None
    ) -> bytes:
        """The file of ``image``: the worker's own (``worker_file``) when it wrote it as asked, else encoded here
        (pixels from an older worker or a custom executor), timed as the image_encode stage."""
        data = encoded_as(worker_file, output_format, compression)
        if data is not None:
            return data
        started = time.perf_counter()
        data = encode_image(image, output_format, compression)
        metrics.STAGE_TIME.labels(model_name, "image_encode").observe(time.perf_counter() - started)
        return data


def _reported_quality(body: ImageOptions) -> str | None:
    """The quality a response reports for the one ``body`` asked for (None: it asked for none)."""
    quality = getattr(body, "quality", None)
    return _EFFECTIVE_QUALITY.get(quality, quality)


async def _prepared(engine: DiffusionEngine, request: OmniDiffusionRequest) -> OmniDiffusionRequest:
    """``request`` prepared by ``engine``: in a thread when it may resize uploaded images (that must not block
    the event loop); a request without images is only checked and filled in, quicker than a hop to a thread."""
    if request.images or request.mask is not None:
        return await asyncio.to_thread(engine.prepare, request)
    return engine.prepare(request)


async def _files(
    encode: Callable[..., bytes], output_format: str, compression: int | None, item: DiffusionOutput | PartialImages
) -> list[bytes]:
    """The file of each image of ``item``: the worker's bytes as they are, or images encoded here, in a thread."""
    files = [encoded_as(worker_file, output_format, compression) for worker_file in item.encoded]
    if item.encoded and None not in files:
        return files
    return await asyncio.to_thread(_encode_all, encode, item)


def _encode_all(encode: Callable[..., bytes], item: DiffusionOutput | PartialImages) -> list[bytes]:
    """The file of each image of ``item`` (an image the worker did not encode as asked is encoded here)."""
    worker_files = item.encoded or [None] * len(item.images)
    return [encode(image, worker_file) for image, worker_file in zip(item.images, worker_files)]


# Stands in a response's JSON for each image's base64, spliced in by _json_with_base64.
_BASE64_PLACEHOLDER = f"imagegen-base64-{uuid.uuid4().hex}"


def _json_with_base64(response: ImagesResponse, files: list[bytes]) -> bytes:
    """``response`` as JSON (as its route's response_model writes it: None fields left out), with each
    b64_json placeholder replaced, in order, by the base64 of its file. Base64's alphabet needs no escaping in
    JSON, so the megabytes are copied once instead of scanned by a JSON encoder (pydantic's dump_json took 7-36 ms
    for one 1024x1024 PNG here, bench/bench_png_writers.py)."""
    pieces = response.model_dump_json(exclude_none=True).encode().split(_BASE64_PLACEHOLDER.encode())
    assert len(pieces) == len(files) + 1, "a placeholder per image, and nowhere else"
    joined = [pieces[0]]
    for data, piece in zip(files, pieces[1:]):
        joined += [pybase64.b64encode(data), piece]
    return b"".join(joined)


async def _released_after(events: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    """``events``, then ``release()`` once they are sent or the client left."""
    try:
        async for event in events:
            yield event
    finally:
        release()


def fairness_key(http_request: Request, fairness_header: str | None) -> str:
    """Whom the request counts for in the fair queue and the per-key cap: the ``fairness_header`` value
    (--fairness-header, trusting the proxy that sets it), else the API key that matched (as a digest,
    see ApiKeyMiddleware), else the client's address."""
    if fairness_header:
        value = http_request.headers.get(fairness_header)
        if value:
            return f"header:{key_digest(value.encode())}"
    digest = getattr(http_request.state, "api_key_digest", None)
    if digest is not None:
        return f"key:{digest}"
    return f"client:{http_request.client.host if http_request.client else 'unknown'}"


def duration_text(seconds: float) -> str:
    """``seconds`` as OpenAI writes x-ratelimit-reset-*: "250ms", "1.5s", "2m3s"."""
    if round(seconds * 1000) < 1000:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


def _finished(http_request: Request, output: DiffusionOutput) -> None:
    """Note what the generation took (for the request's log line); raise its error."""
    http_request.state.generation = {
        "images": len(output.images),
        "queue_time_s": round(output.queue_time_s, 4),
        "inference_time_s": round(output.inference_time_s, 4),
    }
    if output.error is not None:
        raise GenerationFailedError(output.error)


# One item of AsyncDiffusionEngine.stream(): the request's progress, then its output.
StreamItem = PartialImages | StepProgress | DiffusionOutput


async def _server_sent_events(
    http_request: Request,
    item: StreamItem,
    items: AsyncIterator[StreamItem],
    events: Callable[[StreamItem], list[str]],
) -> AsyncIterator[str]:
    """The events of each partial image and step as soon as it comes, then the completed events; an
    error after the first event can only be told in an error event."""
    try:
        while not isinstance(item, DiffusionOutput):
            yield "".join(await asyncio.to_thread(events, item))
            item = await anext(items)
            if isinstance(item, DiffusionOutput):
                _finished(http_request, item)
        yield "".join(await asyncio.to_thread(events, item))
    except EngineError as error:
        yield _server_sent_event(engine_error_event(error))
    finally:
        await items.aclose()  # when the client left: cancels the request


def _events(prefix: str, encode: Callable[..., bytes], fields: dict, item: StreamItem) -> list[str]:
    """The server-sent events of one item of a stream: a progress event for a StepProgress, a
    partial_image event per image of a PartialImages, or a completed event per image of the DiffusionOutput."""
    created_at = int(time.time())
    if isinstance(item, StepProgress):
        progress = ProgressEvent(
            type=f"{prefix}.progress", step=item.step, total_steps=item.total_steps, created_at=created_at
        )
        return [_server_sent_event(progress)]
    fields = {**fields, "created_at": created_at}
    if isinstance(item, PartialImages):
        events: list[BaseModel] = [
            PartialImageEvent(
                type=f"{prefix}.partial_image",
                b64_json=pybase64.b64encode(data).decode(),
                partial_image_index=item.index,
                **fields,
            )
            for data in _encode_all(encode, item)
        ]
    else:
        per_image_tokens = item.usage.output_image_tokens // max(1, len(item.images))
        events = [
            CompletedEvent(
                type=f"{prefix}.completed",
                b64_json=pybase64.b64encode(data).decode(),
                usage=_usage(item.usage, 1, per_image_tokens),
                seed=seed,
                **fields,
            )
            for data, seed in zip(_encode_all(encode, item), item.seeds)
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


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``. If the client goes away first, cancel it (a queued request then never runs) and raise
    ClientDisconnected: a hang-up is no server error."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        # The body has been read, so the next message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        # Cancelled by the watcher, not with this handler (the server shutting down): the client left.
        if watcher.done() and not asyncio.current_task().cancelling():
            raise ClientDisconnected from None
        raise
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
