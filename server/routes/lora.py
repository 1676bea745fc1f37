"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes): LoRA adapters at run time.

Included only with --allow-runtime-lora (else both are 404), and both need the admin key
(--admin-api-key), not a user's: an adapter changes the models every tenant sees.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from engine import InvalidRequestError
from engine.models import ModelRegistry
from server.errors import ERROR_RESPONSES
from server.protocol import LoadLoraAdapterRequest, ModelCard, UnloadedModel, UnloadLoraAdapterRequest
from server.routes import served_models
from server.routes.models import admin_refusal, lora_card, model_card
from workers.config import LoraModule

router = APIRouter()

LOAD_PATH, UNLOAD_PATH = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
# The paths that check the admin key themselves (the API-key middleware leaves them alone).
ADMIN_PATHS = frozenset({LOAD_PATH, UNLOAD_PATH})


@router.post(LOAD_PATH, response_model=ModelCard, responses=ERROR_RESPONSES)
async def load_lora_adapter(
    body: LoadLoraAdapterRequest, http_request: Request, registry: ModelRegistry = Depends(served_models)
):
    """Load an adapter on every worker of ``body.model`` (loading the model if needed); requests pick it with
    ``model: lora_name`` once this answers. Model ids and adapter names are one namespace: a name taken is 400."""
    if (refusal := admin_refusal(http_request)) is not None:
        return refusal
    model = registry.get(body.model)
    owner = registry.adapter_owner(body.lora_name)
    if body.lora_name in registry.models or (owner is not None and owner is not model):
        what = "a model" if body.lora_name in registry.models else f"an adapter of the model '{owner.name}'"
        raise InvalidRequestError(f"The name '{body.lora_name}' is {what} already.", param="lora_name")
    adapter = LoraModule(body.lora_name, body.lora_path, body.lora_scale)
    async with registry.use(model) as front:
        await front.load_lora_adapter(adapter)
    return lora_card(model_card(http_request, model), adapter.name, adapter.path)


@router.post(UNLOAD_PATH, response_model=UnloadedModel, responses=ERROR_RESPONSES)
async def unload_lora_adapter(
    body: UnloadLoraAdapterRequest, http_request: Request, registry: ModelRegistry = Depends(served_models)
):
    """Refuse new requests for the adapter at once (404), and answer once its queued and running
    requests have finished and every worker has dropped it."""
    if (refusal := admin_refusal(http_request)) is not None:
        return refusal
    model = registry.adapter_owner(body.lora_name)
    if model is None:
        raise registry.not_found(body.lora_name)
    if model.engine is None and model.loading is None:  # not loaded: only its next load would bring it back
        registry.forget_adapter(model, body.lora_name)
        return UnloadedModel(id=body.lora_name)
    async with registry.use(model) as front:
        await front.unload_lora_adapter(body.lora_name)
    return UnloadedModel(id=body.lora_name)
