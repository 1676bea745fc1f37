"""What a request may ask of the served model, and what it runs with: RequestRules checks each request
(400s name the field) and fills in every default before a step goes out."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from engine.errors import InvalidRequestError
from engine.images import OUTPUT_FORMATS, resize_pixels
from engine.lora import LoraRegistry
from workers.config import OmniDiffusionConfig, parse_size
from workers.data import Default, LoraWeight, OmniDiffusionRequest, with_defaults

MAX_IMAGES_PER_REQUEST = 10  # OpenAI's limit on n
MAX_GUIDANCE_SCALE = 50.0
MAX_SEED = 2**63 - 1 - MAX_IMAGES_PER_REQUEST  # image i uses seed + i, which must stay a valid int64
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit on partial_images
MAX_LORA_SCALE = 10.0  # far past any adapter's useful range; negative scales (the opposite effect) too
# OpenAI quality -> multiple of default_num_inference_steps (capped at max_num_inference_steps).
QUALITY_STEP_FACTORS = {
    "low": 0.5,
    "medium": 1.0,
    "auto": 1.0,
    "standard": 1.0,
    "high": 2.0,
    "hd": 2.0,
    "xhigh": 3.0,
    "max": 4.0,
}


def steps_for_quality(quality: str, default_steps: int, max_steps: int) -> int:
    """Denoising steps for an OpenAI ``quality``: the default step count in force x
    QUALITY_STEP_FACTORS[quality], within 1..max_steps."""
    steps = round(default_steps * QUALITY_STEP_FACTORS[quality])
    return max(1, min(steps, max_steps))


class RequestRules:
    """The checks and defaults of one served model: its settings, the description its workers gave
    (``model_info``), the defaults in force and its LoRA adapters."""

    def __init__(
        self, od_config: OmniDiffusionConfig, model_info: dict[str, Any], defaults: dict[str, Default],
        loras: LoraRegistry,
    ):
        self.od_config = od_config
        self.model_info = model_info
        self.defaults = defaults
        self.loras = loras

    def prepare(self, request: OmniDiffusionRequest, admitted: bool = False) -> OmniDiffusionRequest:
        """Validate ``request`` and fill every default (workers.data.with_defaults decides them).

        A text-to-image model's input image is resized to the request's size here; an edit that names
        no size gets the first image's (see _edit_size). Preparing a prepared request returns it unchanged.
        ``admitted``: the request was queued before now (step() checks it again), so a LoRA adapter
        being unloaded since is still its to run with: the unload waits for it.
        """
        config = self.od_config
        # 1. What the client sent: text, image count, seed list, input image and mask.
        if not isinstance(request.prompt, str) or (not request.images and not request.prompt.strip()):
            raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            if text is not None and len(text) > config.max_prompt_length:
                raise InvalidRequestError(
                    f"{name} is {len(text)} characters long; the limit is {config.max_prompt_length}", param=name
                )
        if not 1 <= request.num_images <= MAX_IMAGES_PER_REQUEST:
            raise InvalidRequestError(
                f"num_images must be between 1 and {MAX_IMAGES_PER_REQUEST}, got {request.num_images}",
                param="num_images",
            )
        if isinstance(request.seed, list):
            request = dataclasses.replace(request, seed=tuple(request.seed))
        if isinstance(request.seed, tuple) and len(request.seed) != request.num_images:
            raise InvalidRequestError(
                f"seed lists one seed per image: expected {request.num_images} seeds, got {len(request.seed)}",
                param="seed",
            )
        self._check_images(request)
        request = self._check_loras(request, admitted)
        if request.images and request.width is None:
            width, height = self._edit_size(request.images[0])
            request = dataclasses.replace(request, width=width, height=height)
        # 2. Defaults, then the ranges of what the request will run with.
        request = with_defaults(request, config, self.model_info)
        if not self.size_allowed(request.width, request.height):
            raise InvalidRequestError(
                f"size {request.width}x{request.height} is not supported; choose one of "
                f"{', '.join(config.allowed_sizes)}, or a size whose sides are multiples of "
                f"{self.model_info['size_multiple']} with at most {config.max_output_pixels} pixels",
                param="size",
            )
        steps = request.num_inference_steps
        if not 1 <= steps <= config.max_num_inference_steps:
            raise InvalidRequestError(
                f"num_inference_steps must be between 1 and {config.max_num_inference_steps}, got {steps}",
                param="num_inference_steps",
            )
        guidance = request.guidance_scale
        if guidance is not None and not 0 <= guidance <= MAX_GUIDANCE_SCALE:
            raise InvalidRequestError(
                f"guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE:g}, got {guidance}", param="guidance_scale"
            )
        if request.output_format not in OUTPUT_FORMATS:
            raise InvalidRequestError(
                f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {request.output_format!r}",
                param="output_format",
            )
        compression = request.output_compression
        if compression is not None and not 0 <= compression <= 100:
            raise InvalidRequestError(
                f"output_compression must be between 0 and 100, got {compression}", param="output_compression"
            )
        if not 0 <= request.partial_images <= MAX_PARTIAL_IMAGES:
            raise InvalidRequestError(
                f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, got {request.partial_images}",
                param="partial_images",
            )
        for seed in request.image_seeds():
            if not 0 <= seed <= MAX_SEED:
                raise InvalidRequestError(f"seed must be between 0 and {MAX_SEED}, got {seed}", param="seed")
        if not request.images:
            return request
        if not self.model_info.get("edit_model"):
            # No effect on other models, and a gRPC worker before contract version 3 is never sent it.
            request = dataclasses.replace(request, input_fidelity=None)
        elif request.mask is None:
            # An instruction-edit model's references keep their own size (no strength: its own call).
            return request
        strength = request.strength
        if not 0 < strength <= 1:
            raise InvalidRequestError(f"strength must be in (0, 1], got {strength}", param="strength")
        # img2img runs only the last steps * strength steps; diffusers refuses to run none.
        if int(steps * strength) < 1:
            raise InvalidRequestError(
                f"num_inference_steps ({steps}) x strength ({strength:g}) must be at least 1", param="strength"
            )
        # 3. The input image (and mask) at the output size.
        return dataclasses.replace(
            request,
            images=(resize_pixels(request.images[0], request.width, request.height),),
            mask=None if request.mask is None else resize_pixels(request.mask, request.width, request.height),
        )

    def _check_images(self, request: OmniDiffusionRequest) -> None:
        """Input images and a mask the model can take: as many images as it takes, a task it has (a
        text-to-image request needs a model that makes images from text alone)."""
        info, model = self.model_info, self.od_config.model_name
        if not request.images and request.mask is not None:
            raise InvalidRequestError("a mask needs an image to apply to", param="mask")
        task = request.task
        if task not in info["tasks"]:
            if task == "text2img":
                raise InvalidRequestError(
                    f"The model '{model}' edits images and cannot make one from text alone (its pipeline is "
                    f"{info['pipeline']}); send the images to /v1/images/edits.",
                    param="model",
                )
            raise InvalidRequestError(
                f"The model '{model}' does not support {task} (its pipeline is {info['pipeline']}).",
                param="mask" if task == "inpaint" else "image",
            )
        if not request.images:
            return
        self.check_image_count(len(request.images))
        limits = info.get("reference_limits") or {}
        for index, image in enumerate(request.images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise InvalidRequestError("image must be a uint8 HxWx3 array", param="image")
            height, width = image.shape[:2]
            too_small = limits and min(width, height) < limits["min_side"]
            if too_small or (limits and max(width / height, height / width) > limits["max_aspect_ratio"]):
                raise InvalidRequestError(
                    f"image {index} is {width}x{height}; the model '{model}' takes references whose sides are at "
                    f"least {limits['min_side']} pixels, at most {limits['max_aspect_ratio']}:1",
                    param="image",
                )
        image, mask = request.images[0], request.mask
        if mask is not None and mask.shape[:2] != image.shape[:2]:
            raise InvalidRequestError(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}; "
                "they must be the same size",
                param="mask",
            )

    def check_image_count(self, count: int) -> None:
        """At most the model's max_input_images input images (routes check before decoding them)."""
        limit = self.model_info.get("max_input_images", 1)
        if count > limit:
            raise InvalidRequestError(
                f"{count} images were sent; the model '{self.od_config.model_name}' takes at most {limit} per "
                "request.",
                param="image",
            )

    def _edit_size(self, image: np.ndarray) -> tuple[int, int]:
        """The size of an edit that names none (size "auto"). An instruction-edit model makes the first
        image's size, rounded to its size multiple and scaled down to at most max_output_pixels; a
        text-to-image model makes the image's own size where it is a size we serve, else the default size."""
        height, width = image.shape[:2]
        if not self.model_info.get("edit_model"):
            return (width, height) if self.size_allowed(width, height) else parse_size(self.defaults["size"].value)
        multiple, most = self.model_info["size_multiple"], self.od_config.max_output_pixels
        scale = min(1.0, math.sqrt(most / (width * height)))
        # Nearest multiple, unless scaled down to the pixel limit: then the multiple below, to stay under it.
        fit = math.floor if scale < 1 else round
        return tuple(max(multiple, fit(side * scale / multiple) * multiple) for side in (width, height))

    def _check_loras(self, request: OmniDiffusionRequest, admitted: bool) -> OmniDiffusionRequest:
        """Served adapters (404 naming one that is not), each named once and at most --max-loras-per-request
        of them, their scales filled in and in range."""
        limit = self.od_config.max_loras_per_request
        if len(request.loras) > limit:
            raise InvalidRequestError(
                f"{len(request.loras)} LoRA adapters were named; the limit is {limit} per request", param="loras"
            )
        filled = []
        for index, lora in enumerate(request.loras):
            if index and lora.name == request.loras[index - 1].name:  # the names are sorted: twins are neighbours
                raise InvalidRequestError(f"LoRA adapter '{lora.name}' is named twice", param="loras")
            adapter = self.loras.get(lora.name, param="loras", unloading=admitted)
            scale = adapter.scale if lora.scale is None else lora.scale
            if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
                raise InvalidRequestError(
                    f"the scale of LoRA adapter '{lora.name}' must be between {-MAX_LORA_SCALE:g} and "
                    f"{MAX_LORA_SCALE:g}, got {scale}",
                    param="loras",
                )
            filled.append(LoraWeight(lora.name, float(scale)))
        return dataclasses.replace(request, loras=tuple(filled))

    def size_allowed(self, width: int, height: int) -> bool:
        """A listed size, or any whose sides are multiples of the model's size multiple within max_output_pixels."""
        if f"{width}x{height}" in self.od_config.allowed_sizes:
            return True
        multiple = self.model_info["size_multiple"]
        return (
            width > 0 and height > 0 and width % multiple == 0 and height % multiple == 0
            and width * height <= self.od_config.max_output_pixels
        )

