"""DiffusionEngine: validates and completes requests, runs steps through an executor, post-processes."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from engine import metrics
from engine.errors import EngineDeadError, InvalidRequestError, from_executor_error
from engine.images import resize_pixels, to_pil
from engine.lora import LoraRegistry
from executors import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerRpcError,
    get_executor_class,
)
from workers.config import OmniDiffusionConfig, parse_size
from workers.data import (
    LoraWeight,
    OmniDiffusionRequest,
    PartialImageOutput,
    RequestOutput,
    RunningSetIteration,
    StepProgress,
    Usage,
    WorkerProgress,
    defaults_in_force,
    with_defaults,
)

logger = logging.getLogger(__name__)

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


@dataclass
class DiffusionOutput:
    """The result of one request: ``num_images`` PIL images, the request's seed, or an error.

    ``rank`` is the worker that served it (None when the engine rejected the request);
    ``seeds`` holds each image's seed. Partial images go to ``progress_listeners`` instead.
    """

    request_id: str
    images: list[Image.Image]
    seed: int | tuple[int, ...] | None
    error: str | None = None
    rank: int | None = None
    seeds: list[int] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    # Filled in by AsyncDiffusionEngine: seconds queued, and seconds of the step that served it.
    queue_time_s: float | None = None
    inference_time_s: float | None = None


@dataclass(frozen=True)
class PartialImages:
    """Partial image ``index`` of each of a request's images, decoded while it is denoised."""

    request_id: str
    index: int
    images: list[Image.Image]


def memory_per_device(descriptions: list[dict]) -> dict[str, int]:
    """The memory the ranks' weights hold, per device, from their describe() replies (ranks that share
    a device, CPU ranks among them, add up)."""
    total: dict[str, int] = {}
    for description in descriptions:
        for device, size in (description.get("memory_bytes") or {}).items():
            total[device] = total.get(device, 0) + size
    return total


class DiffusionEngine:
    """Owns the executor and turns requests into images, one ``step()`` at a time.

    ``step()`` is thread-safe: several steps may be in flight (the async front keeps the
    workers busy while the previous step's images are post-processed). A running request's
    progress goes to ``progress_listeners`` from another thread: each PartialImages while its
    step runs (backends mp and ray) or just before it returns (backends that send them with the
    reply), never twice; each StepProgress while its step runs (backends that cannot stream
    send none).
    """

    def __init__(self, od_config: OmniDiffusionConfig):
        self.od_config = od_config
        self._closed = False
        # Why the engine cannot serve any more (policy "exit", or a restart that failed).
        self.fatal_error: str | None = None
        # Called with the reason once the engine turns fatal; the server exits on it.
        self.fatal_listeners: list[Callable[[str], None]] = []
        # Called with each PartialImages or StepProgress of a running request (see the class docstring).
        self.progress_listeners: list[Callable[[PartialImages | StepProgress], None]] = []
        self._restarting_ranks: set[int] = set()
        self._lock = threading.Lock()
        executor_class = get_executor_class(od_config.distributed_executor_backend)
        self.executor = executor_class(od_config)
        self.executor.death_listeners.append(self._on_worker_death)
        self.executor.progress_listeners.append(self._on_progress)
        try:
            # Every rank's reply, then rank 0's: a custom executor that takes unique_reply_rank=0 for
            # "no rank" (the guide's `if unique_reply_rank` idiom) still gives the engine a good answer.
            descriptions = self.collective_rpc("describe")
            self.model_info: dict[str, Any] = {**descriptions[0], "memory_bytes": memory_per_device(descriptions)}
            # The start-up adapters (--lora-modules), on every rank, before the first request.
            self.loras = LoraRegistry(self.executor, od_config.model_name)
            for adapter in od_config.lora_adapters:
                try:
                    self.loras.load(adapter)
                except InvalidRequestError as error:
                    raise RuntimeError(f"LoRA adapter '{adapter.name}': {error}") from None
        except BaseException:
            self.executor.shutdown()
            raise
        # What a request that names nothing runs with (a setting, the model's imagegen.json, built-in).
        self.defaults = defaults_in_force(od_config, self.model_info)
        # request or step (--scheduling): whether a step carries one request the workers run in their running set.
        self.scheduling = self._scheduling_in_force()
        # Step mode: images sent to each rank group and not answered yet (see _route).
        self._images_in_flight = [0] * od_config.num_rank_groups
        for rank in range(od_config.num_gpus):
            metrics.WORKER_UP.labels(od_config.model_name, str(rank)).set(1)
        if od_config.compile != "none":
            metrics.RECOMPILES.labels(od_config.model_name)  # exported from the start, at 0
        for component, size in (self.model_info.get("weight_bytes") or {}).items():
            metrics.MODEL_WEIGHT_BYTES.labels(od_config.model_name, component).set(size)
        logger.info("engine ready: %s", self.model_info)
        logger.info(
            "defaults in force: %s",
            ", ".join(f"{name}={default.value} ({default.source})" for name, default in self.defaults.items()),
        )

    def _scheduling_in_force(self) -> str:
        """--scheduling, or request with one line why when step mode cannot run here."""
        if self.od_config.scheduling == "request":
            return "request"
        refusal = self.model_info.get("step_mode_refusal")
        if refusal is not None:
            logger.warning("--scheduling step runs as request: %s", refusal)
            return "request"
        logger.info("--scheduling step: each worker runs a running set, requests join it at every denoising step")
        return "step"

    # -- requests ------------------------------------------------------------------------------
    def prepare(self, request: OmniDiffusionRequest, admitted: bool = False) -> OmniDiffusionRequest:
        """Validate ``request`` and fill every default (workers.data.with_defaults decides them).

        An input image is resized to the request's size here (and the size defaults to the
        image's own when that is allowed). Preparing a prepared request returns it unchanged.
        ``admitted``: the request was queued before now (step() checks it again), so a LoRA adapter
        being unloaded since is still its to run with: the unload waits for it.
        """
        config = self.od_config
        # 1. What the client sent: text, image count, seed list, input image and mask.
        if not isinstance(request.prompt, str) or (request.image is None and not request.prompt.strip()):
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
        self._check_image(request)
        request = self._check_loras(request, admitted)
        if request.image is not None and not self.size_allowed(request.image.shape[1], request.image.shape[0]):
            # An input image's own size is the default only where it is a size we serve.
            width, height = parse_size(self.defaults["size"].value)
            request = dataclasses.replace(request, width=request.width or width, height=request.height or height)
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
        if not 0 <= request.partial_images <= MAX_PARTIAL_IMAGES:
            raise InvalidRequestError(
                f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES}, got {request.partial_images}",
                param="partial_images",
            )
        for seed in request.image_seeds():
            if not 0 <= seed <= MAX_SEED:
                raise InvalidRequestError(f"seed must be between 0 and {MAX_SEED}, got {seed}", param="seed")
        if request.image is None:
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
            image=resize_pixels(request.image, request.width, request.height),
            mask=None if request.mask is None else resize_pixels(request.mask, request.width, request.height),
        )

    def _check_image(self, request: OmniDiffusionRequest) -> None:
        """An input image and mask the model can take (text-to-image requests have neither)."""
        if request.image is None:
            if request.mask is not None:
                raise InvalidRequestError("a mask needs an image to apply to", param="mask")
            return
        task = request.task
        if task not in self.model_info["tasks"]:
            raise InvalidRequestError(
                f"The model '{self.od_config.model_name}' does not support {task} "
                f"(its pipeline is {self.model_info['pipeline']}).",
                param="mask" if task == "inpaint" else "image",
            )
        image, mask = request.image, request.mask
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidRequestError("image must be a uint8 HxWx3 array", param="image")
        if mask is not None and mask.shape[:2] != image.shape[:2]:
            raise InvalidRequestError(
                f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]}; "
                "they must be the same size",
                param="mask",
            )

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

    def step(self, requests: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
        """Generate ``requests`` (spread over all ranks); one output per request, in order.

        An invalid request or a pipeline failure is reported in that output's ``error``; a
        failure of the workers themselves raises EngineDeadError or RequestTimeoutError.
        """
        outputs: dict[str, DiffusionOutput] = {}
        runnable: dict[str, OmniDiffusionRequest] = {}
        for request in requests:
            try:
                runnable[request.request_id] = self.prepare(request, admitted=True)
            except InvalidRequestError as error:
                outputs[request.request_id] = DiffusionOutput(request.request_id, [], request.seed, str(error))
        if runnable:
            for reply in self._generate(list(runnable.values())):
                for stage, seconds in reply.stage_seconds.items():
                    metrics.STAGE_TIME.labels(self.od_config.model_name, stage).observe(seconds)
                if reply.compiled_graphs:
                    metrics.RECOMPILES.labels(self.od_config.model_name).inc(reply.compiled_graphs)
                for partial in reply.partial_images:  # from a backend that could not send them earlier
                    self._on_progress(partial)
                outputs[reply.request_id] = DiffusionOutput(
                    reply.request_id,
                    [to_pil(pixels) for pixels in reply.images],
                    reply.seed,
                    reply.error,
                    reply.rank,
                    seeds=runnable[reply.request_id].image_seeds(),
                    usage=reply.usage,
                )
        return [outputs[request.request_id] for request in requests]

    def _on_progress(self, progress: WorkerProgress) -> None:
        if isinstance(progress, RunningSetIteration):  # a metric, not a request's progress
            model_name = self.od_config.model_name
            metrics.RUNNING_SET_SIZE.labels(model_name, str(progress.rank)).set(progress.running)
            metrics.RUNNING_SET_ADMISSIONS.labels(model_name).observe(progress.admitted)
            return
        if isinstance(progress, PartialImageOutput):
            images = [to_pil(pixels) for pixels in progress.images]
            progress = PartialImages(progress.request_id, progress.index, images)
        for listener in self.progress_listeners:
            listener(progress)

    def _generate(self, requests: list[OmniDiffusionRequest]) -> list[RequestOutput]:
        self._raise_if_dead()
        group = self._route(requests)
        try:
            # Straight to the executor: step() prepared these requests already.
            kwargs = {} if group is None else {"group": group}
            shards: list[list[RequestOutput]] = self.executor.collective_rpc(
                "generate_shard", args=(requests,), kwargs=kwargs
            )
            # A rank group's leader answers for it; its other ranks made the same images with it.
            shards = shards[:: self.od_config.rank_group_size]
        except RpcTimeoutError as error:
            for rank in error.ranks:  # a hung worker is treated like a dead one
                self._on_worker_death(rank, f"worker rank {rank} hung: {error}")
            raise from_executor_error(error) from error
        except (WorkerDiedError, WorkerRpcError) as error:
            raise from_executor_error(error) from error
        finally:
            if group is not None:
                with self._lock:
                    self._images_in_flight[group] -= sum(request.num_images for request in requests)
        return [reply for shard in shards for reply in shard]

    def _route(self, requests: list[OmniDiffusionRequest]) -> int | None:
        """Step mode with data parallel: the rank group with the most free room (the fewest images sent
        and not answered yet) takes the whole step. None: every group takes its share (group_shares)."""
        if self.scheduling != "step" or self.od_config.num_rank_groups == 1:
            return None
        with self._lock:
            group = min(range(len(self._images_in_flight)), key=self._images_in_flight.__getitem__)
            self._images_in_flight[group] += sum(request.num_images for request in requests)
        return group

    # -- executor ------------------------------------------------------------------------------
    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        """Call ``method`` on every rank's worker; see DiffusionExecutor.collective_rpc.

        Requests among the arguments (alone or in lists) are prepared first, once, so every rank
        sees the same defaults and seeds: ``collective_rpc("generate", args=(requests,))`` has every
        rank run every request, the same way.
        """
        args = tuple(self._prepare_argument(arg) for arg in args)
        kwargs = {name: self._prepare_argument(value) for name, value in (kwargs or {}).items()}
        return self.executor.collective_rpc(method, timeout, args, kwargs, unique_reply_rank)

    def _prepare_argument(self, value: Any) -> Any:
        if isinstance(value, OmniDiffusionRequest):
            return self.prepare(value)
        if isinstance(value, (list, tuple)) and any(isinstance(item, OmniDiffusionRequest) for item in value):
            return type(value)(self._prepare_argument(item) for item in value)
        return value

    def cancel(self, request_ids: list[str]) -> None:
        """The clients of these running requests went away: let the workers stop early."""
        self.executor.cancel_requests(request_ids)

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
        """Apply ``on_worker_death``: replace the worker (its whole rank group) in the background, or turn fatal."""
        ranks = self.od_config.rank_group_of(rank)
        for member in ranks:
            metrics.WORKER_UP.labels(self.od_config.model_name, str(member)).set(0)
        if self.od_config.on_worker_death == "exit":
            self._turn_fatal(reason)
            return
        with self._lock:
            # One restart per group, however many of its ranks are reported.
            if self._closed or self._restarting_ranks.intersection(ranks):
                return
            self._restarting_ranks.update(ranks)
        threading.Thread(
            target=self._restart, args=(rank, ranks), name=f"imagegen-restart-{rank}", daemon=True
        ).start()

    def _restart(self, rank: int, ranks: range) -> None:
        try:
            self.executor.restart_worker(rank)
        except Exception as error:  # noqa: BLE001 - a worker that cannot come back ends the engine
            self._turn_fatal(f"worker rank {', '.join(map(str, ranks))} could not be restarted: {error}")
        else:
            metrics.WORKER_RESTARTS.labels(self.od_config.model_name).inc(len(ranks))
            for member in ranks:
                metrics.WORKER_UP.labels(self.od_config.model_name, str(member)).set(1)
        finally:
            with self._lock:
                self._restarting_ranks.difference_update(ranks)

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
