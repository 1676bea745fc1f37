"""DiffusionEngine: validates and completes requests, runs steps through an executor, post-processes."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

from engine.errors import EngineDeadError, GenerationFailedError, InvalidRequestError, RequestTimeoutError
from engine.images import to_pil
from executors import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerRpcError,
    get_executor_class,
)
from workers.config import OmniDiffusionConfig, parse_size
from workers.data import OmniDiffusionRequest, RequestOutput

logger = logging.getLogger(__name__)

MAX_IMAGES_PER_REQUEST = 10  # OpenAI's limit on n
MAX_GUIDANCE_SCALE = 50.0
MAX_SEED = 2**63 - 1 - MAX_IMAGES_PER_REQUEST  # image i uses seed + i, which must stay a valid int64


@dataclass
class DiffusionOutput:
    """The result of one request: ``num_images`` PIL images, the seed of the first, or an error.

    ``rank`` is the worker that served it (None when the engine rejected the request).
    """

    request_id: str
    images: list[Image.Image]
    seed: int | None
    error: str | None = None
    rank: int | None = None


class DiffusionEngine:
    """Owns the executor and turns requests into images, one ``step()`` at a time.

    ``step()`` is thread-safe: several steps may be in flight (the async front keeps the
    workers busy while the previous step's images are post-processed).
    """

    def __init__(self, od_config: OmniDiffusionConfig):
        self.od_config = od_config
        self._closed = False
        executor_class = get_executor_class(od_config.distributed_executor_backend)
        self.executor = executor_class(od_config)
        try:
            self.model_info: dict[str, Any] = self.collective_rpc("describe", unique_reply_rank=0)
        except BaseException:
            self.executor.shutdown()
            raise
        self.native_size: str = od_config.default_size or self.model_info["native_size"]
        logger.info("engine ready: %s", self.model_info)

    # -- requests ------------------------------------------------------------------------------
    def prepare(self, request: OmniDiffusionRequest) -> OmniDiffusionRequest:
        """Validate ``request`` and fill every default (size, steps, guidance, seed)."""
        config = self.od_config
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string", param="prompt")
        if not 1 <= request.num_images <= MAX_IMAGES_PER_REQUEST:
            raise InvalidRequestError(
                f"num_images must be between 1 and {MAX_IMAGES_PER_REQUEST}, got {request.num_images}",
                param="num_images",
            )
        default_width, default_height = parse_size(self.native_size)
        width = request.width or default_width
        height = request.height or default_height
        if f"{width}x{height}" not in config.allowed_sizes:
            raise InvalidRequestError(
                f"size {width}x{height} is not supported; choose one of {', '.join(config.allowed_sizes)}",
                param="size",
            )
        steps = request.num_inference_steps or config.default_num_inference_steps
        if not 1 <= steps <= config.max_num_inference_steps:
            raise InvalidRequestError(
                f"num_inference_steps must be between 1 and {config.max_num_inference_steps}, got {steps}",
                param="num_inference_steps",
            )
        guidance = request.guidance_scale if request.guidance_scale is not None else config.default_guidance_scale
        if guidance is not None and not 0 <= guidance <= MAX_GUIDANCE_SCALE:
            raise InvalidRequestError(
                f"guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE:g}, got {guidance}", param="guidance_scale"
            )
        seed = request.seed if request.seed is not None else random.randint(0, 2**31 - 1)
        if not 0 <= seed <= MAX_SEED:
            raise InvalidRequestError(f"seed must be between 0 and {MAX_SEED}, got {seed}", param="seed")
        return dataclasses.replace(
            request, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance, seed=seed
        )

    def step(self, requests: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
        """Generate ``requests`` (spread over all ranks); one output per request, in order.

        An invalid request or a pipeline failure is reported in that output's ``error``; a
        failure of the workers themselves raises EngineDeadError or RequestTimeoutError.
        """
        outputs: dict[str, DiffusionOutput] = {}
        runnable = []
        for request in requests:
            try:
                runnable.append(self.prepare(request))
            except InvalidRequestError as error:
                outputs[request.request_id] = DiffusionOutput(request.request_id, [], request.seed, str(error))
        if runnable:
            for reply in self._generate(runnable):
                outputs[reply.request_id] = DiffusionOutput(
                    reply.request_id, [to_pil(pixels) for pixels in reply.images], reply.seed, reply.error, reply.rank
                )
        return [outputs[request.request_id] for request in requests]

    def _generate(self, requests: list[OmniDiffusionRequest]) -> list[RequestOutput]:
        if self._closed:
            raise EngineDeadError("the engine is closed")
        try:
            shards: list[list[RequestOutput]] = self.collective_rpc("generate_shard", args=(requests,))
        except RpcTimeoutError as error:
            raise RequestTimeoutError(str(error)) from error
        except WorkerDiedError as error:
            raise EngineDeadError(str(error)) from error
        except WorkerRpcError as error:
            raise GenerationFailedError(str(error)) from error
        return [reply for shard in shards for reply in shard]

    # -- executor ------------------------------------------------------------------------------
    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        """Call ``method`` on every rank's worker; see DiffusionExecutor.collective_rpc."""
        return self.executor.collective_rpc(method, timeout, args, kwargs, unique_reply_rank)

    def check_health(self) -> None:
        """Raise EngineDeadError unless every worker is alive."""
        if self._closed:
            raise EngineDeadError("the engine is closed")
        try:
            self.executor.check_health()
        except ExecutorError as error:
            raise EngineDeadError(str(error)) from error

    def close(self) -> None:
        """Release the executor (and stop workers it owns). Idempotent."""
        if not self._closed:
            self._closed = True
            self.executor.shutdown()

    def __enter__(self) -> DiffusionEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
