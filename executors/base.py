"""DiffusionExecutor: the one transport between the engine and its workers."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from workers.config import OmniDiffusionConfig
from workers.data import WorkerProgress

logger = logging.getLogger(__name__)


class ExecutorError(RuntimeError):
    """Base of the errors an executor raises; the engine maps them to its own. ``ranks`` are the ranks
    at fault, where the executor knows them (the engine sets their rank groups aside or restarts them)."""

    def __init__(self, message: str, ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.ranks = tuple(ranks)


class WorkerStartupError(ExecutorError):
    """A worker could not load its model or never answered the handshake."""


class WorkerDiedError(ExecutorError):
    """A worker process or actor is gone; calls it held are failed with this."""


class RpcTimeoutError(ExecutorError, TimeoutError):
    """A worker did not answer a call within its timeout; ``ranks`` are the ones that did not answer."""


class WorkerRpcError(ExecutorError):
    """A worker answered a call with an error."""


def check_rank_group(od_config: OmniDiffusionConfig, description: dict, where: str) -> None:
    """WorkerStartupError unless a worker someone else started (its ``describe()``) has this engine's rank groups."""
    names = ("cfg_parallel_size", "ulysses_degree", "ring_degree")
    expected = tuple(getattr(od_config, name) for name in names)
    found = tuple(description.get("rank_group", {}).get(name, 1) for name in names)
    if found != expected:
        shape = " x ".join(names)
        raise WorkerStartupError(
            f"{where} was started with rank groups of {shape} = {' x '.join(map(str, found))} but this server has "
            f"{' x '.join(map(str, expected))}: start every worker with the server's group settings"
        )


class DiffusionExecutor(ABC):
    """Starts or connects to workers and forwards calls to them.

    ``collective_rpc`` is the single transport: every other operation is built on it or on
    the backend's liveness check. Backends implement the abstract methods. A backend that can
    deliver the progress a call makes while it still runs (partial images, StepProgress) hands
    each to ``_report_progress``; the others leave the partial images in the call's RequestOutputs.

    A rank the engine has taken out of service (its rank group restarts, or is set aside after a
    failure the executor cannot repair) gets no calls: ``collective_rpc`` calls the ``serving_ranks()``
    only and answers with their replies, in rank order. ``probe_ranks`` and ``recover_ranks`` let
    the engine's health probe watch the ranks and bring a set-aside group back.
    """

    def __init__(self, od_config: OmniDiffusionConfig):
        self.od_config = od_config
        self.is_closed = False
        # Called as listener(rank, reason) when a worker dies while the executor is open.
        self.death_listeners: list[Callable[[int, str], None]] = []
        # Called as listener(progress) with each partial image or StepProgress a worker sends while its call runs.
        self.progress_listeners: list[Callable[[WorkerProgress], None]] = []
        # (method, args) calls that a rank starting again (restarted, or a replaced worker reconnected)
        # gets, in order, after loading its model and before it serves: the engine keeps its LoRA
        # adapters here. Empty while the first workers start.
        self.rank_setup_calls: list[tuple[str, tuple]] = []
        # rank -> (state, why): the ranks out of service, "restarting" or "set_aside"; the rest serve.
        self._out_of_service: dict[int, tuple[str, str]] = {}
        self._service_lock = threading.Lock()
        self._init_executor()

    @abstractmethod
    def _init_executor(self) -> None:
        """Start or find the workers and wait until each is ready to serve."""

    @abstractmethod
    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        """Call ``method`` on every rank's worker.

        Returns the replies in rank order, or only rank ``unique_reply_rank``'s reply.
        ``timeout`` defaults to ``od_config.rpc_timeout_s``.
        """

    @abstractmethod
    def check_health(self) -> None:
        """Raise ExecutorError when a worker is dead or unreachable."""

    @abstractmethod
    def _shutdown_workers(self) -> None:
        """Release the workers (stop them if this executor owns them)."""

    def cancel_requests(self, request_ids: list[str]) -> None:
        """Ask the workers to drop these requests (their clients went away); a pipeline call whose
        requests are all dropped stops at its next denoising step. Best effort; by default nothing
        is sent and the images are dropped when the step ends."""

    def is_ready(self) -> bool:
        """True when every worker can take calls now (none is starting or restarting)."""
        return not self.is_closed

    def restart_worker(self, rank: int) -> None:
        """Replace rank's worker (stopping it first if it still runs) and wait until it is ready."""
        raise NotImplementedError(f"{type(self).__name__} cannot restart its workers")

    @property
    def can_restart_workers(self) -> bool:
        """Whether ``restart_worker`` can replace a worker (the backends that start their own)."""
        return type(self).restart_worker is not DiffusionExecutor.restart_worker

    # -- ranks in and out of service -----------------------------------------------------------------
    def take_out_of_service(self, ranks: range | tuple[int, ...], state: str, reason: str) -> None:
        """No calls go to ``ranks`` from now on; ``state`` ("restarting" or "set_aside") and ``reason`` say why."""
        with self._service_lock:
            self._out_of_service.update((rank, (state, reason)) for rank in ranks)

    def return_to_service(self, ranks: range | tuple[int, ...]) -> None:
        with self._service_lock:
            for rank in ranks:
                self._out_of_service.pop(rank, None)

    def out_of_service(self) -> dict[int, tuple[str, str]]:
        """rank -> (state, reason) of every rank that gets no calls now."""
        with self._service_lock:
            return dict(self._out_of_service)

    def serving_ranks(self) -> list[int]:
        with self._service_lock:
            return [rank for rank in range(self.od_config.num_gpus) if rank not in self._out_of_service]

    def probe_ranks(self, ranks: range, timeout: float) -> dict[int, str]:
        """The ranks among ``ranks`` that fail a health probe within ``timeout``, with why. The default probes
        nothing: a backend that cannot look at one rank alone finds failures through its calls."""
        return {}

    def recover_ranks(self, ranks: range, timeout: float) -> bool:
        """Try to bring a set-aside rank group back: True once it is initialized again (its ``rank_setup_calls``
        replayed, the group formed) and can serve. The default restarts it where the backend can."""
        if not self.can_restart_workers:
            return False
        self.restart_worker(ranks[0])
        return True

    def _set_up_rank(self, rank: int, call: Callable[[str, tuple], Any]) -> None:
        """Run ``rank_setup_calls`` on a rank that starts again, each through ``call(method, args)``
        (the backend's way to reach that one rank); a call answered ``{"error": ...}`` fails its start."""
        for method, args in list(self.rank_setup_calls):
            reply = call(method, args)
            if isinstance(reply, dict) and reply.get("error"):
                raise WorkerStartupError(f"worker rank {rank}: {method}{args} failed: {reply['error']}")

    def _report_worker_death(self, rank: int, reason: str) -> None:
        for listener in self.death_listeners:
            listener(rank, reason)

    def _report_progress(self, progress: WorkerProgress) -> None:
        for listener in self.progress_listeners:
            try:
                listener(progress)
            except Exception:  # noqa: BLE001 - a listener must not take the transport down with it
                logger.exception("a progress listener failed")

    def shutdown(self) -> None:
        """Idempotent."""
        if self.is_closed:
            return
        self.is_closed = True
        self._shutdown_workers()

    def _timeout(self, timeout: float | None) -> float:
        return self.od_config.rpc_timeout_s if timeout is None else timeout
