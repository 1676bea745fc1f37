"""DiffusionEngine: validates and completes requests, runs steps through an executor, post-processes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from engine import metrics
from engine.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    NoServingGroupError,
    from_executor_error,
)
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
    group_shares,
    PartialImageOutput,
    RequestOutput,
    RunningSetIteration,
    StepProgress,
    Usage,
    WorkerProgress,
    defaults_in_force,
)

logger = logging.getLogger(__name__)

# The states of a rank group (metric imagegen_rank_groups): it serves, or gets no calls while it is
# replaced (restarting) or after a failure it could not be repaired from (set_aside, probed until it answers).
SERVING, RESTARTING, SET_ASIDE = "serving", "restarting", "set_aside"


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
    # Why this request alone failed (its rank group failed during the step); the others of the step are served.
    failure: EngineError | None = None
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
        self._lock = threading.Lock()
        self._probing = threading.Lock()  # one probe pass at a time
        self._probe_stop = threading.Event()
        # Leader rank -> when its group was set aside: it is probed for re-admission one interval later at the
        # soonest, so a worker that is about to say it hangs (its call's deadline just passed) cannot slip back.
        self._set_aside_at: dict[int, float] = {}
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
        # Step mode: images sent to each rank group and not answered yet (see _route).
        self._images_in_flight = [0] * od_config.num_rank_groups
        for rank in range(od_config.num_gpus):
            metrics.WORKER_UP.labels(od_config.model_name, str(rank)).set(1)
        self._count_groups()
        if od_config.compile != "none":
            metrics.RECOMPILES.labels(od_config.model_name)  # exported from the start, at 0
        for component, size in (self.model_info.get("weight_bytes") or {}).items():
            metrics.MODEL_WEIGHT_BYTES.labels(od_config.model_name, component).set(size)
        logger.info("engine ready: %s", self.model_info)
        logger.info(
            "defaults in force: %s",
            ", ".join(f"{name}={default.value} ({default.source})" for name, default in self.defaults.items()),
        )
        threading.Thread(target=self._probe_every_interval, name="imagegen-probe", daemon=True).start()

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

    def _generate(
        self, requests: list[OmniDiffusionRequest]
    ) -> tuple[list[RequestOutput], dict[str, EngineError]]:
        """The serving rank groups' replies, and the requests that failed with their group (request id -> why).

        When a rank fails in a step split over several groups, its group's share fails and the rest
        of the step runs again on the groups still serving (their replies were lost with the call).
        """
        self._raise_if_dead()
        serving = self.serving_groups()
        if not serving and not self._restarting():
            self.probe()  # the last chance before a 503: a group that is back serves this very step
            serving = self.serving_groups()
        if not serving:
            raise self._no_serving_group()
        group = self._route(requests, serving)
        if group is not None:
            kwargs: dict = {"group": group}
        else:
            kwargs = {} if len(serving) == self.od_config.num_rank_groups else {"groups": tuple(serving)}
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
            replies, failures = self._generate([r for r in requests if r.request_id not in lost])
            return replies, {**failures, **lost}
        finally:
            if group is not None:
                with self._lock:
                    self._images_in_flight[group] -= sum(request.num_images for request in requests)
        # A rank group's leader answers for it; its other ranks made the same images with it.
        return [reply for shard in shards[:: self.od_config.rank_group_size] for reply in shard], {}

    def _route(self, requests: list[OmniDiffusionRequest], serving: list[int]) -> int | None:
        """Step mode with data parallel: the serving rank group with the most free room (the fewest images
        sent and not answered yet) takes the whole step. None: every serving group takes its share (group_shares)."""
        if self.scheduling != "step" or self.od_config.num_rank_groups == 1:
            return None
        with self._lock:
            group = min(serving, key=self._images_in_flight.__getitem__)
            self._images_in_flight[group] += sum(request.num_images for request in requests)
        return group

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
            self._on_ranks_failed(error.ranks, str(error))
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
            self._on_ranks_failed(error.ranks, str(error))
        if not self.serving_groups() and not self._restarting():
            self.probe()  # the last chance before a 503: a group that is back serves this very call
            if not self.serving_groups():
                raise self._no_serving_group()

    def _raise_if_dead(self) -> None:
        if self._closed:
            raise EngineDeadError("the engine is closed")
        if self.fatal_error is not None:
            raise EngineDeadError(self.fatal_error)

    def is_ready(self) -> bool:
        """Readiness: alive, and at least one rank group serves."""
        return not self._closed and self.fatal_error is None and self.executor.is_ready() and bool(self.serving_groups())

    # -- rank groups -------------------------------------------------------------------------------
    def group_states(self) -> dict[int, tuple[str, str | None]]:
        """Each rank group's (state, reason): SERVING, RESTARTING or SET_ASIDE, and why it is out of service."""
        out = self.executor.out_of_service()
        size = self.od_config.rank_group_size
        states: dict[int, tuple[str, str | None]] = {}
        for group in range(self.od_config.num_rank_groups):
            found = [out[rank] for rank in range(group * size, (group + 1) * size) if rank in out]
            states[group] = found[0] if found else (SERVING, None)
        return states

    def _restarting(self) -> bool:
        return any(state == RESTARTING for state, _ in self.group_states().values())

    def serving_groups(self) -> list[int]:
        return [group for group, (state, _) in self.group_states().items() if state == SERVING]

    def set_aside_ranks(self) -> dict[int, str]:
        """rank -> why, for every rank of a set-aside group (what /health lists)."""
        return {rank: reason for rank, (state, reason) in self.executor.out_of_service().items() if state == SET_ASIDE}

    def _no_serving_group(self) -> NoServingGroupError:
        reasons = "; ".join(dict.fromkeys(self.set_aside_ranks().values())) or "no rank group serves"
        return NoServingGroupError(f"no worker can serve now: {reasons}")

    def _count_groups(self) -> None:
        states = [state for state, _ in self.group_states().values()]
        for state in (SERVING, RESTARTING, SET_ASIDE):
            metrics.RANK_GROUPS.labels(self.od_config.model_name, state).set(states.count(state))

    def _on_worker_death(self, rank: int, reason: str) -> None:
        self._on_ranks_failed((rank,), reason)

    def _on_ranks_failed(self, ranks: tuple[int, ...], reason: str) -> None:
        """Apply ``on_worker_death`` to each failed rank's group: restart it in the background where the backend
        can, else set it aside (or turn fatal under "exit"). A group out of service already is left as it is."""
        failed_ranks = {self.od_config.rank_group_of(rank): rank for rank in reversed(ranks)}
        for group, failed_rank in failed_ranks.items():
            for member in group:
                metrics.WORKER_UP.labels(self.od_config.model_name, str(member)).set(0)
            if self.od_config.on_worker_death == "exit":
                self._turn_fatal(reason)
                return
            restart = self.executor.can_restart_workers
            with self._lock:
                if self._closed or any(rank in self.executor.out_of_service() for rank in group):
                    continue
                self.executor.take_out_of_service(group, RESTARTING if restart else SET_ASIDE, reason)
                self._set_aside_at[group[0]] = time.monotonic()
            self._count_groups()
            if restart:
                threading.Thread(
                    target=self._restart, args=(failed_rank, group), name=f"imagegen-restart-{failed_rank}", daemon=True
                ).start()
            else:
                logger.error("rank group of rank %s set aside: %s", ", ".join(map(str, group)), reason)

    def _restart(self, rank: int, ranks: range) -> None:
        try:
            self.executor.restart_worker(rank)  # the failed rank: the executor names it as the cause
        except Exception as error:  # noqa: BLE001 - the group waits for the probe to try again
            reason = f"worker rank {', '.join(map(str, ranks))} could not be restarted: {error}"
            logger.error("rank group set aside: %s", reason)
            self.executor.take_out_of_service(ranks, SET_ASIDE, reason)
            self._set_aside_at[ranks[0]] = time.monotonic()
        else:
            self._return_to_service(ranks)
        self._count_groups()

    def _return_to_service(self, ranks: range) -> None:
        self.executor.return_to_service(ranks)
        metrics.WORKER_RESTARTS.labels(self.od_config.model_name).inc(len(ranks))
        for member in ranks:
            metrics.WORKER_UP.labels(self.od_config.model_name, str(member)).set(1)

    def _recover(self, ranks: range, timeout: float) -> bool:
        try:
            return self.executor.recover_ranks(ranks, timeout)
        except Exception as error:  # noqa: BLE001 - it stays aside; the next probe tries again
            logger.error("rank group of rank %s is still aside: %s", ", ".join(map(str, ranks)), error)
            return False

    def _probe_every_interval(self) -> None:
        interval = self.od_config.health_check_interval_s
        while not self._probe_stop.wait(interval):
            try:
                self.probe()
            except Exception:  # noqa: BLE001 - the probe must outlive any one failure
                logger.exception("the rank-group probe failed")

    def probe(self) -> None:
        """One probe pass: serving groups that answer no health probe are taken out of service, set-aside
        groups that answer again are initialized anew (adapters replayed, group formed) and re-admitted.
        Each probe waits at most half the interval."""
        if self._closed or self.fatal_error is not None or not self._probing.acquire(blocking=False):
            return
        try:
            timeout = self.od_config.health_check_interval_s / 2
            size = self.od_config.rank_group_size
            for group, (state, _) in self.group_states().items():
                ranks = range(group * size, (group + 1) * size)
                if state == SERVING:
                    failed = self.executor.probe_ranks(ranks, timeout)
                    if failed:
                        self._on_ranks_failed(tuple(failed), "; ".join(failed.values()))
                elif (
                    state == SET_ASIDE
                    and time.monotonic() - self._set_aside_at.get(group * size, 0.0) >= self.od_config.health_check_interval_s
                    and self._recover(ranks, timeout)
                ):
                    logger.info("rank group of rank %s answers again: re-admitted", ", ".join(map(str, ranks)))
                    self._return_to_service(ranks)
                    self._count_groups()
        finally:
            self._probing.release()

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
            self._probe_stop.set()
            self.executor.shutdown()

    def __enter__(self) -> DiffusionEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
