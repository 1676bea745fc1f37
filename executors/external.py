"""ExternalDiffusionExecutor ("external_launcher"): workers whose lifecycle someone else owns.

A subclass says how to reach its workers by implementing four template methods; this class
builds the executor's whole interface (collective_rpc, check_health, shutdown) on them and maps
whatever they raise onto the executor errors the engine understands.
"""

from __future__ import annotations

import logging
from typing import Any

from executors.base import (
    DiffusionExecutor,
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerRpcError,
    WorkerStartupError,
)
from workers.logs import describe_error

logger = logging.getLogger(__name__)

# How long the default health check waits for each worker's rank.
HEALTH_CHECK_TIMEOUT_S = 5.0

_REQUIRED = ("_connect_to_workers", "_forward_rpc_to_workers")
_OPTIONAL = ("_check_worker_health", "_disconnect_from_workers")


class ExternalDiffusionExecutor(DiffusionExecutor):
    """Connects to workers that are started and stopped outside the engine (Ray actors, pods, ...).

    Subclasses implement ``_connect_to_workers`` (find the workers, fill ``self.worker_handles``
    in rank order) and ``_forward_rpc_to_workers``; ``_check_worker_health`` and
    ``_disconnect_from_workers`` have defaults. Closing the engine only disconnects: the workers
    keep running and a new engine can connect to them again.
    """

    worker_handles: list[Any]

    # -- template methods --------------------------------------------------------------------------
    def _connect_to_workers(self) -> None:
        """Find the workers and append one handle per rank, in rank order, to ``self.worker_handles``."""
        raise NotImplementedError

    def _forward_rpc_to_workers(
        self, method: str, timeout: float, args: tuple, kwargs: dict, unique_reply_rank: int | None
    ) -> Any:
        """Call ``method`` on the workers; return every rank's reply in rank order, or rank
        ``unique_reply_rank``'s reply alone (compare it with ``is None``: rank 0 is falsy).

        Raise RpcTimeoutError / WorkerDiedError / WorkerRpcError, or any exception: TimeoutError
        and ConnectionError map to the first two, anything else to WorkerRpcError.
        """
        raise NotImplementedError

    def _check_worker_health(self) -> None:
        """Raise when a worker is dead or unreachable. Default: every worker must answer
        ``get_rank`` with its own rank within HEALTH_CHECK_TIMEOUT_S."""
        ranks = self._forward_rpc_to_workers("get_rank", HEALTH_CHECK_TIMEOUT_S, (), {}, None)
        if list(ranks) != list(range(len(self.worker_handles))):
            raise WorkerDiedError(f"workers answered ranks {ranks}, expected 0..{len(self.worker_handles) - 1}")

    def _disconnect_from_workers(self) -> None:
        """Let go of the workers without stopping them. Default: forget the handles."""
        self.worker_handles = []

    # -- DiffusionExecutor -------------------------------------------------------------------------
    def _init_executor(self) -> None:
        missing = [name for name in _REQUIRED if _is_default(type(self), name)]
        if missing:
            raise NotImplementedError(
                f"{type(self).__name__} cannot reach any worker: the 'external_launcher' backend needs a "
                f"subclass of executors.ExternalDiffusionExecutor that implements {' and '.join(missing)} "
                f"(and may override {' and '.join(_OPTIONAL)}). Pass the subclass, or 'package.module:Class', "
                "as distributed_executor_backend; see docs/executors.md."
            )
        self.worker_handles = []
        try:
            self._connect_to_workers()
        except BaseException as error:
            self._disconnect_quietly()
            if isinstance(error, Exception) and not isinstance(error, ExecutorError):
                raise WorkerStartupError(f"could not connect to the workers: {describe_error(error)}") from error
            raise
        if not self.worker_handles:
            self._disconnect_quietly()
            raise WorkerStartupError(f"{type(self).__name__} connected to no worker")
        logger.info("%s connected to %d worker(s)", type(self).__name__, len(self.worker_handles))

    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        if self.is_closed:
            raise WorkerDiedError(f"{type(self).__name__} is disconnected from its workers")
        timeout = self._timeout(timeout)
        try:
            return self._forward_rpc_to_workers(method, timeout, tuple(args), dict(kwargs or {}), unique_reply_rank)
        except ExecutorError:
            raise
        except TimeoutError as error:
            raise RpcTimeoutError(f"RPC '{method}' timed out after {timeout:g}s: {describe_error(error)}") from error
        except ConnectionError as error:
            raise WorkerDiedError(f"RPC '{method}' lost its worker: {describe_error(error)}") from error
        except Exception as error:
            raise WorkerRpcError(f"RPC '{method}' failed: {describe_error(error)}") from error

    def check_health(self) -> None:
        if self.is_closed:
            raise WorkerDiedError(f"{type(self).__name__} is disconnected from its workers")
        try:
            self._check_worker_health()
        except ExecutorError:
            raise
        except Exception as error:
            # Whatever a subclass raises, the server must see an ExecutorError to answer 503.
            raise WorkerDiedError(f"worker health check failed: {describe_error(error)}") from error

    def _shutdown_workers(self) -> None:
        # Disconnect only: the workers belong to whoever started them.
        self._disconnect_from_workers()

    def _disconnect_quietly(self) -> None:
        try:
            self._disconnect_from_workers()
        except Exception:  # noqa: BLE001 - the connection error is the one worth reporting
            logger.exception("%s: disconnecting after a failed connect raised", type(self).__name__)


def _is_default(cls: type, name: str) -> bool:
    return getattr(cls, name) is getattr(ExternalDiffusionExecutor, name)

