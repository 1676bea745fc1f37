"""The FastAPI app: OpenAI-compatible routes over an AsyncDiffusionEngine."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import (
    AsyncDiffusionEngine,
    DiffusionEngine,
    DiffusionOutput,
    EngineDeadError,
    EngineError,
    GenerationFailedError,
    InvalidRequestError,
    OmniDiffusionRequest,
    parse_size,
)
from engine.images import encode_image
from server.errors import engine_error_response, install_error_handlers
from server.middleware import BodySizeLimitMiddleware, RequestMetricsMiddleware
from server.protocol import ImageData, ImageGenerationRequest, ImagesResponse, ModelCard, ModelList

T = TypeVar("T")


def create_app(engine: DiffusionEngine) -> FastAPI:
    """An app serving ``engine``. The caller owns the engine; the app owns its batching front."""
    config = engine.od_config
    model_name = config.model_name
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = AsyncDiffusionEngine(engine)
        app.state.engine.start()
        yield
        await app.state.engine.close()

    app = FastAPI(title="imagegen", summary="OpenAI-compatible image generation", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, model_name=model_name)

    @app.post("/v1/images/generations", response_model=ImagesResponse)
    async def create_image(body: ImageGenerationRequest, http_request: Request) -> ImagesResponse:
        if body.model is not None and body.model != model_name:
            raise InvalidRequestError(
                f"The model '{body.model}' does not exist; this server serves '{model_name}'.",
                param="model",
                code="model_not_found",
            )
        width, height = _parse_request_size(body.size)
        request = OmniDiffusionRequest(
            prompt=body.prompt,
            width=width,
            height=height,
            negative_prompt=body.negative_prompt,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            seed=body.seed,
            num_images=body.n,
        )
        output: DiffusionOutput = await _cancel_on_disconnect(http_request, app.state.engine.generate(request))
        if output.error is not None:
            raise GenerationFailedError(output.error)
        encoded = await asyncio.to_thread(
            lambda: [encode_image(image, body.output_format, body.output_compression) for image in output.images]
        )
        first_image = output.images[0]
        return ImagesResponse(
            created=int(time.time()),
            data=[
                ImageData(b64_json=base64.b64encode(data).decode(), seed=output.seed + index)
                for index, data in enumerate(encoded)
            ],
            size=f"{first_image.width}x{first_image.height}",
            output_format=body.output_format,
        )

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

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

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


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
    """None or 'auto' leave the choice to the engine (the model's native size)."""
    if size is None or size == "auto":
        return None, None
    try:
        return parse_size(size)
    except ValueError as error:
        raise InvalidRequestError(str(error), param="size") from error
