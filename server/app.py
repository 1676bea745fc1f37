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

from engine import DiffusionEngine
from engine.models import ModelRegistry
from server.errors import install_error_handlers
from server.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, KeyRing, RequestLogMiddleware
from server.routes import files, images, lora, models, playground, probes
from server.serving import ImageServing
from server.storage import ImageStore


def create_app(served: ModelRegistry | DiffusionEngine) -> FastAPI:
    """An app serving the models of ``served`` (a DiffusionEngine: that one model). The caller owns the engines
    it loaded; the app owns the models' batching fronts, the ones it loads, and its image store.

    ``app.state`` holds what the routes share: ``models`` (the ModelRegistry, started with the app),
    ``serving`` (the ImageServing over it), ``store``, ``created`` and ``admin_keys``.
    """
    registry = served if isinstance(served, ModelRegistry) else ModelRegistry.of_engine(served)
    config = registry.server_config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry.start()
        yield
        await registry.close()
        app.state.store.close()

    # /docs and /redoc are the playground router's, with their assets served from this machine.
    app = FastAPI(
        title="imagegen",
        summary="OpenAI-compatible image generation",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.models = registry
    app.state.store = ImageStore(config.image_storage_dir, config.image_ttl_s)
    app.state.serving = ImageServing(registry, app.state.store)
    app.state.created = int(time.time())
    app.state.admin_keys = KeyRing([config.admin_api_key] if config.admin_api_key else [])

    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(
            ApiKeyMiddleware,
            api_keys=config.api_key,
            protect_metrics=config.metrics_require_api_key,
            has_own_key=lambda method, path: path in lora.ADMIN_PATHS or models.is_admin_path(method, path),
        )
    app.add_middleware(RequestLogMiddleware, model_name=registry.first.name)

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
