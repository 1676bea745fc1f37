"""GET /v1/models and /v1/models/{model_id}: the one model this server serves, with what it accepts."""

from __future__ import annotations

from fastapi import APIRouter, Request

from engine import NotFoundError
from server.errors import ERROR_RESPONSES
from server.protocol import ModelCard, ModelList

router = APIRouter()


def _model_card(http_request: Request) -> ModelCard:
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
        levers=engine.model_info.get("levers"),
    )


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(http_request: Request) -> ModelList:
    return ModelList(data=[_model_card(http_request)])


# :path, because hub ids such as "org/model" hold a slash.
@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model_id: str, http_request: Request) -> ModelCard:
    card = _model_card(http_request)
    if model_id != card.id:
        raise NotFoundError(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return card
