"""GET /v1/models and /v1/models/{model_id}: the base model, and each LoRA adapter on it (with ``parent``
set to the base model's id, as vLLM lists them), with what they accept."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import ERROR_RESPONSES
from server.protocol import ModelCard, ModelList

router = APIRouter()


def base_model_card(http_request: Request) -> ModelCard:
    engine = http_request.app.state.engine.engine
    config = engine.od_config
    return ModelCard(
        id=config.model_name,
        created=http_request.app.state.created,
        allowed_sizes=config.allowed_sizes,
        default_size=engine.defaults["size"].value,
        default_num_inference_steps=engine.defaults["num_inference_steps"].value,
        default_guidance_scale=engine.defaults["guidance_scale"].value,
        max_num_inference_steps=config.max_num_inference_steps,
        tasks=engine.model_info["tasks"],
        max_input_images=engine.model_info.get("max_input_images", 1),
        levers=engine.model_info.get("levers"),
        quantization=engine.model_info.get("quantization"),
        memory_bytes=engine.model_info.get("memory_bytes"),
        weight_bytes=engine.model_info.get("weight_bytes"),
        root=config.model,
    )


def lora_card(base: ModelCard, name: str, path: str) -> ModelCard:
    """An adapter's card: what its base model accepts, under its own id."""
    return base.model_copy(update={"id": name, "parent": base.id, "root": path})


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(http_request: Request) -> ModelList:
    base = base_model_card(http_request)
    adapters = http_request.app.state.engine.engine.loras.served()
    return ModelList(data=[base, *(lora_card(base, adapter.name, adapter.path) for adapter in adapters)])


# :path, because hub ids such as "org/model" hold a slash.
@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, http_request: Request) -> ModelCard:
    base = base_model_card(http_request)
    if model_id == base.id:
        return base
    adapter = http_request.app.state.engine.engine.loras.get(model_id)  # 404 model_not_found for any other id
    return lora_card(base, adapter.name, adapter.path)
