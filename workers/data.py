"""Requests and per-request results as they cross the engine → executor → worker boundary."""

from __future__ import annotations

import dataclasses
import random
import uuid
from dataclasses import dataclass, field

import numpy as np

from workers.config import OmniDiffusionConfig, parse_size


@dataclass(frozen=True)
class OmniDiffusionRequest:
    """One request for ``num_images`` images: text-to-image, or image-to-image when ``image`` is given.

    Fields left as None are filled from the config by the engine before a worker sees them.
    ``seed`` is an int (image ``i`` is drawn with ``seed + i``) or one seed per image.
    ``image`` is a uint8 HxWx3 array of the request's size; ``mask`` (uint8 HxW, 255 = repaint)
    turns image-to-image into inpainting. ``partial_images`` asks for that many intermediate
    decodes at evenly spaced denoising steps.
    """

    prompt: str
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | tuple[int, ...] | None = None
    num_images: int = 1
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Arrays compare element-wise, so they stay out of the generated __eq__.
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    partial_images: int = 0
    # False runs it without the step cache (--cache-method); such requests never share a call with cached ones.
    cache: bool = True

    @property
    def task(self) -> str:
        """Which pipeline serves it: text2img, img2img or inpaint."""
        if self.image is None:
            return "text2img"
        return "img2img" if self.mask is None else "inpaint"

    def image_seeds(self) -> list[int]:
        """The seed of each image (``seed`` must have been filled in)."""
        if isinstance(self.seed, tuple):
            return list(self.seed)
        return [self.seed + i for i in range(self.num_images)]

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            self.guidance_scale,
            self.negative_prompt is not None,
            self.task,
            self.strength,
            self.partial_images,
            self.cache,
        )


def with_defaults(
    request: OmniDiffusionRequest, od_config: OmniDiffusionConfig, model_info: dict
) -> OmniDiffusionRequest:
    """``request`` with every field it leaves unset filled in; the one place that decides defaults.

    The engine calls it once per request before a step goes out, so every rank sees the same
    values (the same seed above all); a worker called directly fills whatever is still unset by
    the same rules. ``model_info`` is a worker's ``describe()``.

    - size: an input image's own size, else ``default_size``, else the model's native size;
    - steps: ``default_num_inference_steps``; guidance: ``default_guidance_scale`` (None leaves
      the pipeline's own);
    - seed: a random one; strength (edits): the pipeline's own default for the task.
    """
    if request.image is not None:
        default_height, default_width = request.image.shape[:2]
    else:
        default_width, default_height = parse_size(od_config.default_size or model_info["native_size"])
    strength = request.strength
    if strength is None and request.image is not None:
        strength = model_info["default_strength"].get(request.task)
    guidance = request.guidance_scale
    return dataclasses.replace(
        request,
        width=request.width or default_width,
        height=request.height or default_height,
        num_inference_steps=request.num_inference_steps or od_config.default_num_inference_steps,
        guidance_scale=guidance if guidance is not None else od_config.default_guidance_scale,
        seed=request.seed if request.seed is not None else random.randint(0, 2**31 - 1),
        strength=strength,
    )


@dataclass
class Usage:
    """What a request consumed: prompt tokens (the pipeline's tokenizer) and image tokens (latent positions)."""

    text_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0


@dataclass
class PartialImageOutput:
    """Partial image ``index`` of each of a request's images (uint8 HxWx3), decoded mid-denoising."""

    request_id: str
    index: int
    images: list[np.ndarray]


@dataclass
class RequestOutput:
    """A worker's answer for one request: uint8 HxWx3 arrays (not PIL objects, which pickle badly).

    ``partial_images`` holds the request's partial images, in denoising order, only when the
    worker's host could not send them on while the request ran (see WorkerWrapperBase.progress_sink).
    """

    request_id: str
    images: list[np.ndarray]
    seed: int | tuple[int, ...] | None
    rank: int
    error: str | None = None
    partial_images: list[PartialImageOutput] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    # Seconds of the pipeline call that served it, by stage: text_encode, denoise, vae_decode.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Graphs torch.compile made during that call (set on the call's first request only, so a sum over
    # requests counts each call once); after the start-up warm-up, each one is a recompile.
    compiled_graphs: int = 0
