"""DiffusionEngine: validates and completes requests, runs steps through an executor, post-processes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from engine import metrics
from engine.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    from_executor_error,
)
from engine.images import to_pil
from engine.lora import LoraRegistry
from engine.rank_groups import RankGroups
from engine.requests import RequestRules
from engine.running_sets import RunningSetRoom
from executors import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    get_executor_class,
)
from workers.config import OmniDiffusionConfig
from workers.data import (
    EncodedImage,
    OmniDiffusionRequest,
    PartialImageOutput,
    RequestOutput,
    RunningSetIteration,
    StepProgress,
    Usage,
    WorkerProgress,
    defaults_in_force,
    group_shares,
)

logger = logging.getLogger(__name__)



@dataclass
class DiffusionOutput:
    """The result of one request: ``num_images`` PIL images, the request's seed, or an error.

    ``rank`` is the worker that served it (None when the engine rejected the request);
    ``seeds`` holds each image's seed. Partial images go to ``progress_listeners`` instead.
    When the worker encoded the images (the request's output_format), ``encoded`` holds its files and
    ``images`` decode them lazily, when their pixels are first read.
    """

    request_id: str
    images: list[Image.Image]
    seed: int | tuple[int, ...] | None
    error: str | None = None
    rank: int | None = None
    seeds: list[int] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    # The worker's file of each image, in order (empty when it sent pixels): what the server sends as it is.
    encoded: list[EncodedImage] = field(default_factory=list)
    # Why this request alone failed (its rank group failed during the step); the others of the step are served.
    failure: EngineError | None = None
    # Filled in by AsyncDiffusionEngine: seconds queued, and seconds of the step that served it.
    queue_time_s: float | None = None
    inference_time_s: float | None = None


@dataclass(frozen=True)
class PartialImages:
    """Partial image ``index`` of each of a request's images, decoded while it is denoised (``encoded`` as for
    DiffusionOutput)."""

    request_id: str
    index: int
    images: list[Image.Image]
    encoded: list[EncodedImage] = field(default_factory=list)


def encoded_images(images: list) -> list[EncodedImage]:
    """A worker's files of ``images`` when it encoded every one (else none: the server encodes them all)."""
    files = [image for image in images if isinstance(image, EncodedImage)]
    return files if len(files) == len(images) else []


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

    Faults stay local to a rank group: a group whose rank dies or hangs is restarted (backends that
    own their workers) or set aside, and only the requests it held fail; the other groups go on
    serving. A background probe checks every group each ``health_check_interval_s`` and re-admits a
    set-aside group once it answers again and is initialized anew.
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
        # Step mode: called when requests' last denoising steps begin, so room frees (from another thread).
        self.finishing_listeners: list[Callable[[], None]] = []
        executor_class = get_executor_class(od_config.distributed_executor_backend)
        self.executor = executor_class(od_config)
        self.rank_groups = RankGroups(self.executor, od_config, self._turn_fatal)
        self.executor.death_listeners.append(lambda rank, reason: self.rank_groups.on_failed((rank,), reason))
        self.executor.progress_listeners.append(self._on_progress)
        try:
            # Every rank's reply, then rank 0's: a custom executor that takes unique_reply_rank=0 for
            # "no rank" (the guide's `if unique_reply_rank` idiom) still gives the engine a good answer.
            descriptions = self.collective_rpc("describe")
            self.model_info: dict[str, Any] = {**descriptions[0], "memory_bytes": memory_per_device(descriptions)}
            # The start-up adapters (--lora-modules), on every rank, before the first request.
            self.loras = LoraRegistry(self.executor, od_config.model_name, self._call_ranks)
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
        # Step mode: the requests in each rank group's running set, and when each is due there.
        self.running_sets = RunningSetRoom(od_config.max_batch_size, od_config.num_rank_groups)
        if od_config.compile != "none":
            metrics.RECOMPILES.labels(od_config.model_name)  # exported from the start, at 0
        for component, size in (self.model_info.get("weight_bytes") or {}).items():
            metrics.MODEL_WEIGHT_BYTES.labels(od_config.model_name, component).set(size)
        logger.info("engine ready: %s", self.model_info)
        logger.info(
            "defaults in force: %s",
            ", ".join(f"{name}={default.value} ({default.source})" for name, default in self.defaults.items()),
        )
        self.rank_groups.start_probing()

    def _scheduling_in_force(self) -> str:
        """--scheduling, or request with one line why when step mode cannot run here."""
        if self.od_config.scheduling == "request":
            return "request"
        refusal = self.model_info.get("step_mode_refusal")
        if refusal is not None:
            # Asked for, it is worth a warning; as the default, it is how such a model runs.
            asked = "scheduling" in self.od_config.model_fields_set
            (logger.warning if asked else logger.info)("--scheduling step runs as request: %s", refusal)
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
        try:
            return self._step(requests)
        finally:
            if self.scheduling == "step":  # out of their running sets, placed there by the async front or _route
                self.running_sets.answered(request.request_id for request in requests)

    def _step(self, requests: list[OmniDiffusionRequest]) -> list[DiffusionOutput]:
        outputs: dict[str, DiffusionOutput] = {}
        runnable: dict[str, OmniDiffusionRequest] = {}
        for request in requests:
            try:
                runnable[request.request_id] = self.prepare(request, admitted=True)
            except InvalidRequestError as error:
                outputs[request.request_id] = DiffusionOutput(request.request_id, [], request.seed, str(error))
        if runnable:
            replies, failures = self._generate(list(runnable.values()))
            for request_id, failure in failures.items():
                request = runnable[request_id]
                outputs[request_id] = DiffusionOutput(request_id, [], request.seed, str(failure), failure=failure)
            for reply in replies:
                for stage, seconds in reply.stage_seconds.items():
                    metrics.STAGE_TIME.labels(self.od_config.model_name, stage).observe(seconds)
                if reply.compiled_graphs:
                    metrics.RECOMPILES.labels(self.od_config.model_name).inc(reply.compiled_graphs)
                for partial in reply.partial_images:  # from a backend that could not send them earlier
                    self._on_progress(partial)
                outputs[reply.request_id] = DiffusionOutput(
                    reply.request_id,
                    [to_pil(image) for image in reply.images],
                    reply.seed,
                    reply.error,
                    reply.rank,
                    seeds=runnable[reply.request_id].image_seeds(),
                    usage=reply.usage,
                    encoded=encoded_images(reply.images),
                )
        return [outputs[request.request_id] for request in requests]

    def _on_progress(self, progress: WorkerProgress) -> None:
        if isinstance(progress, RunningSetIteration):  # a metric, not a request's progress
            model_name = self.od_config.model_name
            metrics.RUNNING_SET_SIZE.labels(model_name, str(progress.rank)).set(progress.running)
            metrics.RUNNING_SET_ADMISSIONS.labels(model_name).observe(progress.admitted)
            self.running_sets.iterated(progress.rank // self.od_config.rank_group_size, progress.finishing)
            if progress.finishing:
                for listener in self.finishing_listeners:
                    listener()
            return
        if isinstance(progress, PartialImageOutput):
            images = [to_pil(image) for image in progress.images]
            progress = PartialImages(progress.request_id, progress.index, images, encoded_images(progress.images))
        for listener in self.progress_listeners:
            listener(progress)

    def _generate(
        self, requests: list[OmniDiffusionRequest], retry: bool = True
    ) -> tuple[list[RequestOutput], dict[str, EngineError]]:
        """The serving rank groups' replies, and the requests that failed with their group (request id -> why).

        When a rank fails in a step split over several groups, its group's share fails and the rest
        of the step runs again on the groups still serving (their replies were lost with the call).
        """
        self._raise_if_dead()
        serving = self.rank_groups.serving()
        if not serving and not self.rank_groups.restarting():
            self.rank_groups.probe()  # the last chance before a 503: a group that is back serves this very step
            serving = self.rank_groups.serving()
        if not serving:
            raise self.rank_groups.no_serving_error()
        group = self._route(requests, serving)
        if group is not None and self.od_config.num_rank_groups > 1:
            kwargs: dict = {"group": group}
        else:
            kwargs = {} if len(serving) == self.od_config.num_rank_groups else {"groups": tuple(serving)}
        if self.model_info.get("encodes_images"):
            # The workers write each image as its request's output_format, beside their next step; the server
            # sends their bytes as they are. Workers that do not say so send pixels.
            kwargs["encode"] = True
        try:
            # Straight to the executor: step() prepared these requests already.
            shards: list[list[RequestOutput]] = self._call_ranks("generate_shard", args=(requests,), kwargs=kwargs)
        except ExecutorError as error:
            failure = from_executor_error(error)
            failed = {rank // self.od_config.rank_group_size for rank in error.ranks}
            if group is not None or not failed or failed.issuperset(serving):
                raise failure from error
            shares = group_shares(requests, self.od_config.num_rank_groups, None, tuple(serving))
            lost = {request.request_id: failure for index in failed for request in shares[index]}
            replies, failures = self._generate([r for r in requests if r.request_id not in lost], retry)
            return replies, {**failures, **lost}
        # A rank group's leader answers for it; its other ranks made the same images with it.
        replies = [reply for shard in shards[:: self.od_config.rank_group_size] for reply in shard]
        answered = {reply.request_id for reply in replies}
        unanswered = [request for request in requests if request.request_id not in answered]
        if not unanswered:
            return replies, {}
        # A group was set aside between the routing and the call (the probe runs beside it): its share went
        # nowhere, so it runs again, once, on the groups serving now.
        if not retry:
            failure = EngineDeadError("no worker answered for this request: its rank group was set aside")
            return replies, {request.request_id: failure for request in unanswered}
        more, failures = self._generate(unanswered, retry=False)
        return replies + more, failures

    def _route(self, requests: list[OmniDiffusionRequest], serving: list[int]) -> int | None:
        """Step mode: the serving rank group whose running set takes the whole step (RunningSetRoom.place), its
        requests counted there. None: every serving group takes its share (group_shares)."""
        if self.scheduling != "step":
            return None
        return self.running_sets.place(requests, serving)

    def runs_at_once(self, request: OmniDiffusionRequest) -> bool:
        """Step mode: whether a serving rank group's running set would run ``request`` at its next iteration."""
        serving = self.rank_groups.serving()
        return not serving or self.running_sets.choose([request], serving)[1]

    def place(self, requests: list[OmniDiffusionRequest]) -> None:
        """Step mode: count ``requests`` in the running set that will run them as they leave the queue, so that
        the next ``runs_at_once`` sees them before their step begins; ``step`` sends them there."""
        serving = self.rank_groups.serving()
        if serving:
            self.running_sets.place(requests, serving)

    def _call_ranks(
        self,
        method: str,
        args: tuple = (),
        kwargs: dict | None = None,
        timeout: float | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        """Call ``method`` on every serving rank; a rank that dies or hangs takes its rank group out of service
        (restarted or set aside) before the ExecutorError is raised. Generation and LoRA loads and unloads
        come through here."""
        try:
            return self.executor.collective_rpc(method, timeout, args, kwargs, unique_reply_rank)
        except (RpcTimeoutError, WorkerDiedError) as error:
            self.rank_groups.on_failed(error.ranks, str(error))
            raise

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
        # Straight to the executor: a timeout the caller chose says nothing of the workers' health.
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
        """Liveness: raise EngineDeadError when no rank group serves or is being restarted (NoServingGroupError
        when all are set aside). A serving rank found dead or unreachable is taken out of service first."""
        self._raise_if_dead()
        try:
            self.executor.check_health()
        except ExecutorError as error:
            if not error.ranks:
                raise EngineDeadError(str(error)) from error
            self.rank_groups.on_failed(error.ranks, str(error))
        if not self.rank_groups.serving() and not self.rank_groups.restarting():
            self.rank_groups.probe()  # the last chance before a 503: a group that is back serves this very call
            if not self.rank_groups.serving():
                raise self.rank_groups.no_serving_error()

    def _raise_if_dead(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine is closed")
        if self.fatal_error is not None:
            raise EngineDeadError(self.fatal_error)

    def is_ready(self) -> bool:
        """Readiness: alive, and at least one rank group serves."""
        return (
            not self._closed
            and self.fatal_error is None
            and self.executor.is_ready()
            and bool(self.rank_groups.serving())
        )

    def _turn_fatal(self, reason: str) -> None:
        if self._closed or self.fatal_error is not None:
            return
        self.fatal_error = reason
        self.rank_groups.stop()
        logger.error("engine cannot serve any more: %s", reason)
        for listener in self.fatal_listeners:
            listener(reason)

    def close(self) -> None:
        """Release the executor (and stop workers it owns). Idempotent."""
        if not self._closed:
            self._closed = True
            self.rank_groups.stop()
            self.executor.shutdown()

    def __enter__(self) -> DiffusionEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
