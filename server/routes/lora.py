"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes): LoRA adapters at run time.

Included only with --allow-runtime-lora (else both are 404), and both need the admin key
(--admin-api-key), not a user's: an adapter changes the models every tenant sees.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from engine import AsyncDiffusionEngine
from server.errors import ERROR_RESPONSES
from server.middleware import KeyRing, unauthorized
from server.protocol import LoadLoraAdapterRequest, ModelCard, UnloadedModel, UnloadLoraAdapterRequest
from server.routes import front
from server.routes.models import base_model_card, lora_card
from workers.config import LoraModule

router = APIRouter()

LOAD_PATH, UNLOAD_PATH = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
# The paths that check the admin key themselves (the API-key middleware leaves them alone).
ADMIN_PATHS = frozenset({LOAD_PATH, UNLOAD_PATH})


def _refused(http_request: Request) -> JSONResponse | None:
    """The 401 for a request without the admin key; None when it has it."""
    ring: KeyRing = http_request.app.state.admin_keys
    refusal = ring.refusal(http_request.headers.raw)
    return None if refusal is None else unauthorized(*refusal)


@router.post(LOAD_PATH, response_model=ModelCard, responses=ERROR_RESPONSES)
async def load_lora_adapter(
    body: LoadLoraAdapterRequest, http_request: Request, engine: AsyncDiffusionEngine = Depends(front)
):
    """Load an adapter on every worker; requests pick it with ``model: lora_name`` once this answers."""
    if (refusal := _refused(http_request)) is not None:
        return refusal
    adapter = LoraModule(body.lora_name, body.lora_path, body.lora_scale)
    await engine.load_lora_adapter(adapter)
    return lora_card(base_model_card(http_request), adapter.name, adapter.path)


@router.post(UNLOAD_PATH, response_model=UnloadedModel, responses=ERROR_RESPONSES)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, http_request: Request, engine: AsyncDiffusionEngine = Depends(front)
):
    """Refuse new requests for the adapter at once (404), and answer once its queued and running
    requests have finished and every worker has dropped it."""
    if (refusal := _refused(http_request)) is not None:
        return refusal
    await engine.unload_lora_adapter(body.lora_name)
    return UnloadedModel(id=body.lora_name)
