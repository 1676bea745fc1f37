"""RayDiffusionWorkerActor: one rank's WorkerWrapperBase inside a Ray actor.

Backend ``ray`` launches these actors itself; backend ``ray_external`` finds actors that someone
else created by name. Either way the executor talks to them through the methods below, and
results come back as plain data (RequestOutput with uint8 numpy arrays), which Ray moves
through its shared-memory object store without copying when they are large.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

try:
    import ray
except ImportError as error:  # Ray is an optional extra
    raise ImportError("the Ray backends need Ray: pip install 'imagegen[ray]'") from error

from workers.config import OmniDiffusionConfig
from workers.data import OmniDiffusionRequest, RequestOutput
from workers.hosts.streaming import PipelineThread
from workers.logs import configure_logging, describe_error

logger = logging.getLogger(__name__)

# get_rank() and cancel() run in their own thread, so they never queue behind a generation.
HEALTH_CONCURRENCY_GROUP = "health"
# Calls the actor takes at once. They all wait on its one pipeline thread, which runs them in order;
# in step mode the engine keeps up to step_mode_room generate calls open per rank, as they join and
# leave the running set (backend ray sets this to fit; an actor someone else starts has this default).
MAX_CONCURRENT_CALLS = 64



# num_gpus=1 is only the default: .options(num_gpus=0, num_cpus=k) runs the same actor on CPUs.
@ray.remote(num_gpus=1, max_concurrency=MAX_CONCURRENT_CALLS, concurrency_groups={HEALTH_CONCURRENCY_GROUP: 1})
class RayDiffusionWorkerActor:
    """Owns rank ``rank``'s device and pipeline.

    Create it with ``RayDiffusionWorkerActor.options(num_gpus=..., name=...).remote(rank=rank,
    od_config=config)`` and call ``initialize()`` before use. Whatever touches the pipeline runs on
    its one thread (workers.hosts.streaming.PipelineThread), in the order the calls arrive: the pipeline is
    not thread-safe. In step mode generate calls share that thread's running set.
    """

    def __init__(self, rank: int, od_config: OmniDiffusionConfig):
        configure_logging(od_config.log_format, f"worker{rank}")
        from workers.worker import WorkerWrapperBase  # loads torch: only inside the actor process

        self.rank = rank
        self.od_config = od_config
        self._worker = WorkerWrapperBase(rank, od_config)
        self._description: dict | None = None
        self._initializing = threading.Lock()
        # One thread per CPU that Ray reserved for this actor; without a CPU reservation, the
        # machine's cores split over the ranks, as the mp backend does.
        reserved = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
        # Every method that touches the pipeline runs its work here (execute_rpc_streaming while it
        # yields the call's progress), so that torch runs on one thread of this process.
        self._pipeline = PipelineThread(self._worker, reserved or od_config.cpu_threads_per_rank).start()

    def initialize(self, rank_group_address: str | None = None) -> dict:
        """Load the model. Idempotent: a second call reports the first one's result.

        ``rank_group_address`` (host:port) is where this rank's group meets, when the caller chose it
        (backend ray does, from the leader's ``free_address()``); else od_config's own.

        Returns ``{"status": "ready", ...}`` with the model description, the number of ranks this
        actor was configured for and its Ray node, or ``{"status": "error", "error": ..., "rank": ...}``.
        """
        with self._initializing:  # calls run concurrently: one load, whoever calls first
            return self._initialize(rank_group_address)

    def _initialize(self, rank_group_address: str | None) -> dict:
        if self._description is None:
            if rank_group_address is not None:
                self.od_config.rank_group_address = rank_group_address  # the worker reads this very object
            try:
                self._description = self._pipeline.submit(self._worker.initialize).result()
            except Exception as error:  # noqa: BLE001 - the caller gets one clear line
                logger.exception("rank %d failed to initialize", self.rank)
                return {"status": "error", "error": describe_error(error), "rank": self.rank}
            self._pipeline.use_step_loop()
        return {
            "status": "ready",
            **self._description,
            "num_ranks": self.od_config.num_gpus,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def execute_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> Any:
        """Call ``WorkerWrapperBase.<method>(*args, **kwargs)``.

        Returns its result, or ``{"status": "error", "error": ..., "rank": ...}`` when it raised:
        the actor lives on and the executor turns the dict into an exception.
        """
        try:
            self._check_callable(method)
            return self._pipeline.call(method, args, kwargs).result()
        except Exception as error:  # noqa: BLE001 - reported to the caller; only a broken rank group ends the actor
            return self._error_reply(error)

    @ray.method(num_returns="streaming")
    def execute_rpc_streaming(self, method: str, args: tuple = (), kwargs: dict | None = None) -> Iterator[Any]:
        """execute_rpc as a Ray streaming generator: yields each PartialImageOutput, StepProgress and
        RunningSetIteration the call makes, as soon as it is made, and the call's reply last."""
        try:
            self._check_callable(method)
            yield from self._pipeline.stream(method, args, kwargs)
        except Exception as error:  # noqa: BLE001 - as execute_rpc
            yield self._error_reply(error)

    def _check_callable(self, method: str) -> None:
        # get_logs too: the logs are how an owner finds out why initialize() failed.
        if self._description is None and method not in ("get_rank", "get_logs", "initialize"):
            raise RuntimeError(f"rank {self.rank} is not initialized: call initialize() first")

    def _error_reply(self, error: Exception) -> dict:
        from workers.runtime.rank_group import RankGroupError  # torch: only inside the actor process

        if isinstance(error, RankGroupError):
            # The group is broken: leave, so that the actor's owner starts the group again (backend
            # ray replaces the whole group when it sees this actor die).
            logger.error("rank %d leaves: %s", self.rank, error)
            logging.shutdown()
            os._exit(1)
        return {"status": "error", "error": describe_error(error), "rank": self.rank}

    def generate(self, requests: list[OmniDiffusionRequest]) -> list[RequestOutput]:
        """Generate every request on this rank (pipeline failures are reported per request)."""
        if self._description is None:
            raise RuntimeError(f"rank {self.rank} is not initialized: call initialize() first")
        return self._pipeline.call("generate", (requests,)).result()

    def free_address(self) -> str:
        """<this node's IP>:<a port free on it now>: where a rank group led by this actor can meet."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            return f"{ray.util.get_node_ip_address()}:{probe.getsockname()[1]}"

    @ray.method(concurrency_group=HEALTH_CONCURRENCY_GROUP)
    def get_rank(self) -> int:
        return self.rank

    @ray.method(concurrency_group=HEALTH_CONCURRENCY_GROUP)
    def is_initialized(self) -> bool:
        """Whether the model is loaded: an actor that Ray restarted in place (max_restarts) answers
        get_rank but comes back without its model, so the engine's probe asks this."""
        return self._description is not None

    @ray.method(concurrency_group=HEALTH_CONCURRENCY_GROUP)
    def cancel(self, request_ids: list[str]) -> None:
        """Drop requests whose clients went away; runs beside a generation, like get_rank."""
        self._worker.cancel(request_ids)

    def shutdown(self) -> None:
        """Release the pipeline (and GPU memory). The actor process stays until its owner kills it."""
        self._pipeline.submit(self._worker.shutdown).result()
        self._description = None
