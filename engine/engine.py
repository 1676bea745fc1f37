"""DiffusionEngine: validates and completes requests, runs steps through an executor, post-processes."""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from engine import metrics
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
        # Why the engine cannot serve any more (policy "exit", or a restart that failed).
        self.fatal_error: str | None = None
        # Called with the reason once the engine turns fatal; the server exits on it.
        self.fatal_listeners: list[Callable[[str], None]] = []
        self._restarting_ranks: set[int] = set()
        self._lock = threading.Lock()
        executor_class = get_executor_class(od_config.distributed_executor_backend)
        self.executor = executor_class(od_config)
        self.executor.death_listeners.append(self._on_worker_death)
        try:
            self.model_info: dict[str, Any] = self.collective_rpc("describe", unique_reply_rank=0)
        except BaseException:
            self.executor.shutdown()
            raise
        self.native_size: str = od_config.default_size or self.model_info["native_size"]
        for rank in range(od_config.num_gpus):
            metrics.WORKER_UP.labels(od_config.model_name, str(rank)).set(1)
        logger.info("engine ready: %s", self.model_info)

    # -- requests ------------------------------------------------------------------------------
    def prepare(self, request: OmniDiffusionRequest) -> OmniDiffusionRequest:
        """Validate ``request`` and fill every default (size, steps, guidance, seed)."""
        config = self.od_config
        if not isinstance(request.prompt, str) or not request.prompt.strip():
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
        self._raise_if_dead()
        try:
            shards: list[list[RequestOutput]] = self.collective_rpc("generate_shard", args=(requests,))
        except RpcTimeoutError as error:
            for rank in error.ranks:  # a hung worker is treated like a dead one
                self._on_worker_death(rank, f"worker rank {rank} hung: {error}")
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
        """Liveness: raise EngineDeadError unless every worker is alive or being restarted."""
        self._raise_if_dead()
        try:
            self.executor.check_health()
        except ExecutorError as error:
            if not self._restarting_ranks:
                raise EngineDeadError(str(error)) from error

    def _raise_if_dead(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine is closed")
        if self.fatal_error is not None:
            raise EngineDeadError(self.fatal_error)

    def is_ready(self) -> bool:
        """Readiness: alive, and no worker is starting or restarting."""
        return (
            not self._closed and self.fatal_error is None and not self._restarting_ranks and self.executor.is_ready()
        )

    # -- worker failures -------------------------------------------------------------------------
    def _on_worker_death(self, rank: int, reason: str) -> None:
        """Apply ``on_worker_death``: replace the worker in the background, or turn fatal."""
        metrics.WORKER_UP.labels(self.od_config.model_name, str(rank)).set(0)
        if self.od_config.on_worker_death == "exit":
            self._turn_fatal(reason)
            return
        with self._lock:
            if self._closed or rank in self._restarting_ranks:
                return
            self._restarting_ranks.add(rank)
        threading.Thread(target=self._restart, args=(rank,), name=f"imagegen-restart-{rank}", daemon=True).start()

    def _restart(self, rank: int) -> None:
        try:
            self.executor.restart_worker(rank)
        except Exception as error:  # noqa: BLE001 - a worker that cannot come back ends the engine
            self._turn_fatal(f"worker rank {rank} could not be restarted: {error}")
        else:
            metrics.WORKER_RESTARTS.labels(self.od_config.model_name).inc()
            metrics.WORKER_UP.labels(self.od_config.model_name, str(rank)).set(1)
        finally:
            with self._lock:
                self._restarting_ranks.discard(rank)

    def _turn_fatal(self, reason: str) -> None:
        if self._closed or self.fatal_error is not None:
            return
        self.fatal_error = reason
        logger.error("engine cannot serve any more: %s", reason)
        for listener in self.fatal_listeners:
            listener(reason)

    def close(self) -> None:
        """Release the executor (and stop workers it owns). Idempotent."""
        if not self._closed:
            self._closed = True
            self.executor.shutdown()

    def __enter__(self) -> DiffusionEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
