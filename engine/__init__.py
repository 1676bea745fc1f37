"""The engine owns requests, batching and pre/post-processing. No HTTP here."""

from engine.batcher import AsyncDiffusionEngine
from engine.engine import DiffusionEngine, DiffusionOutput, PartialImages
from engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    GenerationFailedError,
    InvalidRequestError,
    NoServingGroupError,
    NotFoundError,
    RequestTimeoutError,
)
from engine.requests import steps_for_quality
from workers.config import OmniDiffusionConfig, parse_size
from workers.data import EncodedImage, LoraWeight, OmniDiffusionRequest, StepProgress, Usage
from workers.logs import configure_logging

__all__ = [
    "AsyncDiffusionEngine",
    "DiffusionEngine",
    "DiffusionOutput",
    "EncodedImage",
    "EngineDeadError",
    "EngineError",
    "EngineOverloadedError",
    "GenerationFailedError",
    "InvalidRequestError",
    "LoraWeight",
    "NoServingGroupError",
    "NotFoundError",
    "OmniDiffusionConfig",
    "OmniDiffusionRequest",
    "PartialImages",
    "RequestTimeoutError",
    "StepProgress",
    "Usage",
    "configure_logging",
    "parse_size",
    "steps_for_quality",
]
