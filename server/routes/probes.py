"""GET /health (liveness), /ready (readiness) and /metrics (Prometheus): open to probes and scrapers."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import EngineDeadError
from engine.models import ModelRegistry
from engine.residency import FAILED
from server.errors import engine_error_response
from server.routes import served_models

router = APIRouter()


@router.get("/health")
async def health(registry: ModelRegistry = Depends(served_models)) -> JSONResponse:
    """Liveness: 200 while the server serves (listing any set-aside ranks, and the models that failed to load
    or cannot serve), 503 only when no loaded model can serve."""
    # In a thread: external workers are asked over the network (up to a few seconds).
    failing = await asyncio.to_thread(registry.check_health)
    loaded = [model for model in registry.models.values() if model.engine is not None]
    if failing and len(failing) == len(loaded):
        return engine_error_response(failing[0][1])
    several = len(registry.models) > 1  # one model: the answer as it always was
    set_aside = [
        {"rank": rank, "reason": why, **({"model": model.name} if several else {})}
        for model in loaded
        for rank, why in sorted(model.engine.rank_groups.set_aside_ranks().items())
    ]
    if not several:
        return JSONResponse({"status": "ok", "set_aside": set_aside})
    failed = [{"model": model.name, "error": str(error)} for model, error in failing] + [
        {"model": model.name, "error": model.error} for model in registry.models.values() if model.status == FAILED
    ]
    return JSONResponse({"status": "ok", "set_aside": set_aside, "failed_models": failed})


@router.get("/ready")
async def ready(registry: ModelRegistry = Depends(served_models)) -> JSONResponse:
    """Readiness: 200 while every preloaded model that is loaded has a rank group serving; 503 while one has none
    (starting, restarting, all set aside) or the server drains."""
    if registry.draining:
        return engine_error_response(EngineDeadError("the server is shutting down"))
    if not registry.is_ready():
        failing = await asyncio.to_thread(registry.check_health)  # every group aside: say which ranks and why
        if failing:
            return engine_error_response(failing[0][1])
        return engine_error_response(EngineDeadError("a worker is starting or restarting"))
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
