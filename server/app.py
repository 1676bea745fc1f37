"""The FastAPI app: OpenAI-compatible routes over an AsyncDiffusionEngine.

``create_app`` only assembles: error handlers, middleware, the shared state on ``app.state``
and the routers of server/routes/. The request path every image route shares is
server/serving.py.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import BaseModel

from engine import AsyncDiffusionEngine, DiffusionEngine
from server.errors import install_error_handlers
from server.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, KeyRing, RequestLogMiddleware
from server.routes import files, images, lora, models, playground, probes
from server.serving import ImageServing
from server.storage import ImageStore


def create_app(engine: DiffusionEngine) -> FastAPI:
    """An app serving ``engine``. The caller owns the engine; the app owns its batching front and image store.

    ``app.state`` holds what the routes share: ``engine`` (the AsyncDiffusionEngine front, from
    start-up on), ``serving`` (the ImageServing over it), ``store``, ``created`` and ``admin_keys``.
    """
    config = engine.od_config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.engine = AsyncDiffusionEngine(engine)
        app.state.engine.start()
        app.state.serving = ImageServing(app.state.engine, app.state.store)
        yield
        await app.state.engine.close()
        app.state.store.close()

    # /docs and /redoc are the playground router's, with their assets served from this machine.
    app = FastAPI(
        title="imagegen",
        summary="OpenAI-compatible image generation",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = ImageStore(config.image_storage_dir, config.image_ttl_s)
    app.state.created = int(time.time())
    app.state.admin_keys = KeyRing([config.admin_api_key] if config.admin_api_key else [])

    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(
            ApiKeyMiddleware,
            api_keys=config.api_key,
            protect_metrics=config.metrics_require_api_key,
            own_key_paths=lora.ADMIN_PATHS,
        )
    app.add_middleware(RequestLogMiddleware, model_name=config.model_name)

    # The LoRA admin routes exist only when run-time loading is on.
    for family in (images, files, models, probes, playground, *([lora] if config.allow_runtime_lora else [])):
        app.include_router(family.router)
    _add_schemas(app, *images.HAND_PARSED_BODIES)
    return app


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
