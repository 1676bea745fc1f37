"""Requests and per-request results as they cross the engine → executor → worker boundary."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class OmniDiffusionRequest:
    """One text-to-image request for ``num_images`` images.

    Fields left as None are filled from the config by the engine before a worker sees them;
    image ``i`` of the request is drawn with seed ``seed + i``.
    """

    prompt: str
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (self.height, self.width, self.num_inference_steps, self.guidance_scale, self.negative_prompt is not None)


@dataclass
class RequestOutput:
    """A worker's answer for one request: uint8 HxWx3 arrays (not PIL objects, which pickle badly)."""

    request_id: str
    images: list[np.ndarray]
    seed: int | None
    rank: int
    error: str | None = None
