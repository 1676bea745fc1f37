"""The OpenAI Images API as pydantic models (request and response bodies, stream events).

Field names, types and limits follow the official ``openai`` client's types; see
docs/openai-compatibility.md for what each field does here.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Seed = Annotated[int, Field(ge=0)]
Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]


class LoraRequest(BaseModel):
    """One LoRA adapter of a request's ``loras`` (an extension)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a served adapter's model id (GET /v1/models)")
    scale: float | None = Field(None, description="its strength (default: the adapter's own, 1 unless set)")


class ImageOptions(BaseModel):
    """Fields every image route shares. Fields after ``user`` are extensions (the SDK sends them via extra_body)."""

    # Clients send vendor fields we do not know: accepted, and logged once (see server/app.py).
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description="WxH, e.g. 512x512, or auto")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="default: the server's --default-response-format (b64_json unless set)"
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality; ignored for png")
    user: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(None, ge=1, description="overrides the steps that quality maps to")
    guidance_scale: float | None = Field(None, ge=0)
    seed: Seed | list[Seed] | None = Field(None, description="image i uses seed + i, or one seed per image")
    cache: bool = Field(True, description="false runs this request without the server's step cache (--cache-method)")
    lora_scale: float | None = Field(
        None, description="with a LoRA adapter as model: its strength (default: the adapter's own, 1 unless set)"
    )
    loras: list[LoraRequest] | None = Field(
        None,
        description="LoRA adapters to run the base model with together, each at its scale (a multipart form sends "
        "the list as a JSON string)",
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, loras):
        # A multipart form has no lists of objects: its loras field is the list as JSON text.
        if isinstance(loras, str):
            try:
                return json.loads(loras)
            except ValueError as error:
                raise ValueError(f"loras is not valid JSON: {error}") from None
        return loras


class PromptedOptions(ImageOptions):
    """Fields of the routes that take a prompt (generations and edits)."""

    prompt: str = Field(min_length=1)
    background: Literal["transparent", "opaque", "auto"] | None = None
    quality: Quality | None = None
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted and ignored")
    safety_identifier: str | None = None
    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=3)
    progress: bool = Field(False, description="with stream: a progress event after every denoising step (an extension)")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        return prompt


class ImageGenerationRequest(PromptedOptions):
    """POST /v1/images/generations."""

    style: Literal["vivid", "natural"] | None = Field(None, description="accepted and ignored (a DALL-E 3 option)")


class ImageReference(BaseModel):
    """An input image in a JSON body: a ``data:`` URL (the server fetches nothing from the network)."""

    image_url: str | None = None
    file_id: str | None = None


def _json_needs_images(schema: dict) -> None:
    # A JSON body must carry its image; a multipart one sends it as a file, so validation cannot require it.
    schema["required"] = [*schema.get("required", []), "images"]
    schema["properties"]["images"]["minItems"] = 1


class ImageEditRequest(PromptedOptions):
    """POST /v1/images/edits as JSON; the multipart form has the same fields, with files for ``image`` and ``mask``."""

    model_config = ConfigDict(json_schema_extra=_json_needs_images)

    images: list[ImageReference] = Field(
        default_factory=list, max_length=16, description="JSON form of multipart `image` (OpenAI takes up to 16)"
    )
    mask: ImageReference | None = None
    input_fidelity: Literal["high", "low"] | None = Field(
        None, description="edit models: Kontext resizes its reference on low; elsewhere no effect"
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="how far from the input image (default: the pipeline's)"
    )


class ImageVariationRequest(ImageOptions):
    """POST /v1/images/variations (multipart, or JSON with ``images``): image-to-image from the image alone."""

    model_config = ConfigDict(json_schema_extra=_json_needs_images)

    images: list[ImageReference] = Field(default_factory=list, description="JSON form of multipart `image`")
    strength: float | None = Field(
        None, gt=0, le=1, description="how far from the input image (default: the pipeline's)"
    )


class ImageEditForm(BaseModel):
    """The multipart form of /v1/images/edits, for the OpenAPI schema; parsed into ImageEditRequest."""

    image: list[bytes] = Field(json_schema_extra={"items": {"type": "string", "format": "binary"}})
    mask: bytes | None = Field(None, json_schema_extra={"type": "string", "format": "binary"})
    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    strength: float | None = None
    input_fidelity: Literal["high", "low"] | None = None
    stream: bool = False
    partial_images: int | None = None
    progress: bool = False
    loras: str | None = Field(None, description='LoRA adapters as JSON text: [{"name": "sharp", "scale": 0.8}]')


class ImageVariationForm(BaseModel):
    """The multipart form of /v1/images/variations, for the OpenAPI schema; parsed into ImageVariationRequest."""

    image: bytes = Field(json_schema_extra={"type": "string", "format": "binary"})
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    strength: float | None = None


class ImageData(BaseModel):
    """One image: base64 or a URL, and the seed it was drawn with (an extension)."""

    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int


class TokenDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class ImageUsage(BaseModel):
    """OpenAI's usage object; ``images`` (the number of images made) is an extension."""

    input_tokens: int
    input_tokens_details: TokenDetails
    output_tokens: int
    output_tokens_details: TokenDetails
    total_tokens: int
    images: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: str
    quality: str | None = None
    background: Literal["opaque"] | None = None
    usage: ImageUsage


class _StreamEvent(BaseModel):
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int
    output_format: str
    quality: str
    size: str


class PartialImageEvent(_StreamEvent):
    """``image_generation.partial_image`` / ``image_edit.partial_image``."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class CompletedEvent(_StreamEvent):
    """``image_generation.completed`` / ``image_edit.completed``; ``seed`` is an extension."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: ImageUsage
    seed: int


class ProgressEvent(BaseModel):
    """``image_generation.progress`` / ``image_edit.progress`` (an extension, asked for with ``progress``):
    the request has had ``step`` of its ``total_steps`` denoising steps. ``stage`` ``loading_model``: it waits
    for its model to load (``step`` 0; sent at once and then every few seconds until it has loaded)."""

    type: Literal["image_generation.progress", "image_edit.progress"]
    step: int
    total_steps: int
    created_at: int
    stage: Literal["loading_model", "denoising"] = "denoising"


class ModelCard(BaseModel):
    """OpenAI's model object; the fields after ``owned_by`` are extensions (what a client may ask of it)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "imagegen"
    # Extensions: what a request may ask for, and what one that names nothing runs with (the
    # defaults in force: a setting, else the model's imagegen.json, else built in).
    allowed_sizes: list[str] = Field(description="sizes listed by the server's allowed_sizes setting")
    default_size: str | None = Field(
        description="the size of a request that names none; null: the model's native size, known once it has loaded"
    )
    default_num_inference_steps: int
    default_guidance_scale: float | None = Field(description="guidance of a request that names none; null: the pipeline's own")
    max_num_inference_steps: int
    tasks: list[str] = Field(description="text2img, and img2img / inpaint where the model's pipelines allow edits")
    max_input_images: int = Field(1, description="the most images an edit takes (instruction-edit models)")
    levers: dict | None = Field(None, description="the speed levers in effect on its workers (cache, compile, ...)")
    quantization: dict | None = Field(
        None, description="the quantization in effect: method, what each quantized component runs, the denoiser file"
    )
    memory_bytes: dict[str, int] | None = Field(None, description="bytes its weights hold on each device, all ranks")
    weight_bytes: dict[str, int] | None = Field(None, description="bytes of each component's weights on one rank")
    # vLLM's fields: a LoRA adapter names the base model it runs on as parent, and its weights as root.
    parent: str | None = Field(None, description="for a LoRA adapter: the id of the base model it runs on")
    root: str | None = Field(None, description="the model's weights: the base model, or a LoRA adapter's path")
    # Several models per server (docs/models.md).
    status: Literal["loaded", "loading", "unloaded", "failed"] | None = Field(
        None, description="whether the model is loaded now (a request for an unloaded one loads it)"
    )
    status_error: str | None = Field(None, description="why it failed to load (status failed)")
    external: bool | None = Field(
        None, description="its workers are someone else's (grpc, ray_external): this server cannot load or unload it"
    )


class LoadLoraAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's route); ``lora_scale`` is an extension."""

    lora_name: str = Field(description="the model id requests pick the adapter with")
    lora_path: str = Field(description="a diffusers/PEFT folder or a .safetensors file on the workers' host")
    lora_scale: float = Field(1.0, description="the scale of a request that names none")
    model: str | None = Field(None, description="the base model it runs on (default: the server's first model)")


class UnloadLoraAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's route)."""

    lora_name: str


class UnloadedModel(BaseModel):
    """What an unload answers, shaped as OpenAI's answer to deleting a model."""

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ErrorEvent(BaseModel):
    """``error``: the generation failed after the stream had begun (the official clients raise APIError)."""

    type: Literal["error"] = "error"
    error: ErrorDetail
