"""DiffusionEngine: validates and completes requests, runs steps through an executor, post-processes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from engine import metrics
from engine.errors import EngineDeadError, InvalidRequestError, from_executor_error
from engine.images import to_pil
from engine.lora import LoraRegistry
from engine.requests import RequestRules
from executors import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerRpcError,
    get_executor_class,
)
from workers.config import OmniDiffusionConfig
from workers.data import (
    OmniDiffusionRequest,
    PartialImageOutput,
    RequestOutput,
    RunningSetIteration,
    StepProgress,
    Usage,
    WorkerProgress,
    defaults_in_force,
)

logger = logging.getLogger(__name__)


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
        self.rules = RequestRules(od_config, self.model_info, self.defaults, self.loras)
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
        """``request`` checked and with every default filled in (engine.requests.RequestRules.prepare)."""
        return self.rules.prepare(request, admitted)

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
