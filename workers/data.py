"""Requests and per-request results as they cross the engine → executor → worker boundary."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


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


def shard_requests(requests: list[OmniDiffusionRequest], num_shards: int) -> list[list[OmniDiffusionRequest]]:
    """Split one step's requests over the ranks: about equal images each, batchable requests together.

    Requests are ordered by batch key and cut into contiguous runs, so a rank gets at most a few
    groups. Every rank computes the same split from the same list, so a step is one broadcast RPC
    (backend grpc computes it once and sends each rank only its own share, images included).
    """
    by_key: dict[tuple, list[OmniDiffusionRequest]] = defaultdict(list)
    for request in requests:
        by_key[request.batch_key()].append(request)
    total = sum(request.num_images for request in requests)
    shards: list[list[OmniDiffusionRequest]] = [[] for _ in range(num_shards)]
    done = 0
    for group in by_key.values():
        for request in group:
            # The rank whose share of the images holds this request's middle image.
            middle = done + request.num_images / 2
            shards[min(num_shards - 1, int(middle * num_shards / total))].append(request)
            done += request.num_images
    return shards
