"""GET /health (liveness), /ready (readiness) and /metrics (Prometheus): open to probes and scrapers."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import AsyncDiffusionEngine, EngineDeadError, EngineError
from server.errors import engine_error_response
from server.routes import front

router = APIRouter()


@router.get("/health")
async def health(engine: AsyncDiffusionEngine = Depends(front)) -> JSONResponse:
    """Liveness: 200 while the server serves (listing any set-aside ranks), 503 only when nothing can serve."""
    try:
        # In a thread: external workers are asked over the network (up to a few seconds).
        await asyncio.to_thread(engine.engine.check_health)
    except EngineError as error:
        return engine_error_response(error)
    set_aside = sorted(engine.engine.rank_groups.set_aside_ranks().items())
    return JSONResponse({"status": "ok", "set_aside": [{"rank": rank, "reason": why} for rank, why in set_aside]})


@router.get("/ready")
async def ready(engine: AsyncDiffusionEngine = Depends(front)) -> JSONResponse:
    """Readiness: 200 while at least one rank group serves; 503 while none does (starting, restarting, all set
    aside) or the server drains."""
    if engine.draining:
        return engine_error_response(EngineDeadError("the server is shutting down"))
    if not engine.engine.is_ready():
        try:
            await asyncio.to_thread(engine.engine.check_health)  # every group aside: say which ranks and why
        except EngineError as error:
            return engine_error_response(error)
        return engine_error_response(EngineDeadError("a worker is starting or restarting"))
    return JSONResponse({"status": "ready"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
