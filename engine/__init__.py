"""The engine owns requests, batching and pre/post-processing. No HTTP here."""

from engine.batcher import AsyncDiffusionEngine
from engine.engine import DiffusionEngine, DiffusionOutput
from engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    GenerationFailedError,
    InvalidRequestError,
    RequestTimeoutError,
)
from workers.config import OmniDiffusionConfig, parse_size
from workers.data import OmniDiffusionRequest

__all__ = [
    "AsyncDiffusionEngine",
    "DiffusionEngine",
    "DiffusionOutput",
    "EngineDeadError",
    "EngineError",
    "EngineOverloadedError",
    "GenerationFailedError",
    "InvalidRequestError",
    "OmniDiffusionConfig",
    "OmniDiffusionRequest",
    "RequestTimeoutError",
    "parse_size",
]
