"""GET /v1/models and /v1/models/{model_id}: every configured model (with its status: loaded, loading, unloaded,
failed), and each LoRA adapter on it (with ``parent`` set to its model's id, as vLLM lists them), with what
they accept. POST /v1/models/{model_id}/load and /unload (admin key): load or unload a model now."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from engine.models import ModelRegistry
from engine.residency import ServedModel
from server.errors import ERROR_RESPONSES
from server.middleware import KeyRing, unauthorized
from server.protocol import ModelCard, ModelList, UnloadedModel
from server.routes import served_models

router = APIRouter()

LOAD_SUFFIX, UNLOAD_SUFFIX = "/load", "/unload"


def is_admin_path(method: str, path: str) -> bool:
    """Whether ``method`` ``path`` is a model admin route (which checks the admin key itself)."""
    return method == "POST" and path.startswith("/v1/models/") and path.endswith((LOAD_SUFFIX, UNLOAD_SUFFIX))


def admin_refusal(http_request: Request) -> JSONResponse | None:
    """The 401 for a request without the admin key (--admin-api-key); None when it has it."""
    ring: KeyRing = http_request.app.state.admin_keys
    refusal = ring.refusal(http_request.headers.raw)
    return None if refusal is None else unauthorized(*refusal)


def model_card(http_request: Request, model: ServedModel) -> ModelCard:
    """A model's card: from its last load (before the first, from its settings), with its status now."""
    config, info = model.config, model.model_info
    return ModelCard(
        id=model.name,
        created=http_request.app.state.created,
        allowed_sizes=config.allowed_sizes,
        default_size=model.defaults["size"],
        default_num_inference_steps=model.defaults["num_inference_steps"],
        default_guidance_scale=model.defaults["guidance_scale"],
        max_num_inference_steps=config.max_num_inference_steps,
        tasks=info.get("tasks", []),
        max_input_images=info.get("max_input_images", 1),
        levers=info.get("levers"),
        quantization=info.get("quantization"),
        memory_bytes=model.memory_bytes or None,
        weight_bytes=info.get("weight_bytes"),
        root=config.model,
        status=model.status,
        status_error=model.error,
        external=model.external,
    )


def lora_card(base: ModelCard, name: str, path: str) -> ModelCard:
    """An adapter's card: what its base model accepts, under its own id."""
    return base.model_copy(update={"id": name, "parent": base.id, "root": path})


def _adapter_cards(http_request: Request, model: ServedModel) -> list[ModelCard]:
    base = model_card(http_request, model)
    return [base, *(lora_card(base, adapter.name, adapter.path) for adapter in model.served_adapters())]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(http_request: Request, registry: ModelRegistry = Depends(served_models)) -> ModelList:
    return ModelList(
        data=[card for model in registry.models.values() for card in _adapter_cards(http_request, model)]
    )


# :path, because hub ids such as "org/model" hold a slash.
@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(
    model_id: str, http_request: Request, registry: ModelRegistry = Depends(served_models)
) -> ModelCard:
    owner = registry.models.get(model_id) or registry.adapter_owner(model_id)
    if owner is None:
        raise registry.not_found(model_id)
    return next(card for card in _adapter_cards(http_request, owner) if card.id == model_id)


@router.post("/v1/models/{model_id:path}" + LOAD_SUFFIX, response_model=ModelCard, responses=ERROR_RESPONSES)
async def load_model(model_id: str, http_request: Request, registry: ModelRegistry = Depends(served_models)):
    """Load the model now, making room as a request would (admin key); answers its card once it serves."""
    if (refusal := admin_refusal(http_request)) is not None:
        return refusal
    model = registry.get(model_id)
    await registry.load(model)
    return model_card(http_request, model)


@router.post("/v1/models/{model_id:path}" + UNLOAD_SUFFIX, response_model=UnloadedModel, responses=ERROR_RESPONSES)
async def unload_model(model_id: str, http_request: Request, registry: ModelRegistry = Depends(served_models)):
    """Refuse the model's new requests at once (503), and answer once its queued and running requests have
    finished and its workers have exited (admin key)."""
    if (refusal := admin_refusal(http_request)) is not None:
        return refusal
    await registry.unload(registry.get(model_id))
    return UnloadedModel(id=model_id)
