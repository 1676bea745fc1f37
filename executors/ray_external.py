"""RayExternalDiffusionExecutor ("ray_external"): named Ray actors that someone else started.

The actors are RayDiffusionWorkerActor instances (re-exported here), found by name in a Ray
namespace. The engine only connects and disconnects; the actors' owner creates and ends them.
The forwarding, health check and Ray connection code here is shared with backend "ray"
(executors/ray.py), which launches the same actors itself.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

try:
    import ray
    from ray.exceptions import RayActorError, RayError, RayTaskError
except ImportError as error:  # Ray is an optional extra
    raise ImportError("the Ray backends need Ray: pip install 'imagegen[ray]'") from error

from executors.base import (
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerRpcError,
    WorkerStartupError,
    check_rank_group,
)
from executors.external import HEALTH_CHECK_TIMEOUT_S, ExternalDiffusionExecutor
from workers.config import OmniDiffusionConfig
from workers.data import WorkerProgress
from workers.hosts.ray_actor import RayDiffusionWorkerActor

__all__ = ["ACTOR_NAMES_ENV", "RayDiffusionWorkerActor", "RayExternalDiffusionExecutor"]

logger = logging.getLogger(__name__)

# Comma-separated actor names in rank order; the worker_actor_names setting wins over it.
ACTOR_NAMES_ENV = "DIFFUSION_WORKER_ACTOR_NAMES"


# -- the Ray connection ----------------------------------------------------------------------------
# A process has one Ray connection. When an executor opens it, executors share it and the last
# one to close ends it; a connection the application opened is left alone.
_connection_lock = threading.Lock()
_connection_users = 0


def connect_ray(od_config: OmniDiffusionConfig, start_local: bool) -> bool:
    """Make sure this process is connected to Ray; True when the caller must release_ray() later.

    Joins ``od_config.ray_address``, else ``RAY_ADDRESS``; else starts a private local Ray when
    ``start_local``, or looks for a running one on this machine ("auto").
    """
    global _connection_users
    with _connection_lock:
        if ray.is_initialized():
            if _connection_users:
                _connection_users += 1
                return True
            return False
        address = od_config.ray_address or os.environ.get("RAY_ADDRESS") or (None if start_local else "auto")
        options: dict[str, Any] = {"address": address, "namespace": od_config.ray_namespace}
        if address is None:
            options["include_dashboard"] = False
            if sys.platform == "linux":
                # Ray replaces 127.0.0.1 by the machine's routable address but keeps any other
                # loopback address: a Ray private to this engine stays off the network.
                options["_node_ip_address"] = "127.0.0.2"
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = (
                f"at {address!r}" if address != "auto" else "on this machine (no --ray-address or RAY_ADDRESS given)"
            )
            raise WorkerStartupError(f"could not connect to a Ray cluster {where}: {error}") from error
        _connection_users = 1
        logger.info("connected to Ray at %s", ray.get_runtime_context().gcs_address)
        return True


def release_ray(owned: bool) -> None:
    """Undo one connect_ray() that returned True; the last release disconnects (and stops a local Ray)."""
    global _connection_users
    if not owned:
        return
    with _connection_lock:
        _connection_users -= 1
        if _connection_users == 0 and ray.is_initialized():
            ray.shutdown()


def is_error_reply(value: Any) -> bool:
    """The actor's way of saying a call raised: {"status": "error", "error": ..., "rank": ...}."""
    return isinstance(value, dict) and value.get("status") == "error" and "error" in value


# -- the executor ----------------------------------------------------------------------------------
class RayExternalDiffusionExecutor(ExternalDiffusionExecutor):
    """Finds ``RayDiffusionWorkerActor``s by name and forwards calls to them with ``ray.get``.

    Names come from ``od_config.worker_actor_names`` or ``DIFFUSION_WORKER_ACTOR_NAMES``, in
    rank order, and are looked up in ``od_config.ray_namespace`` (default: this driver's).
    """

    _owns_ray_connection = False
    worker_info: list[dict]  # each rank's ready reply: model description, num_ranks, node_id

    def _connect_to_workers(self) -> None:
        self._owns_ray_connection = connect_ray(self.od_config, start_local=False)
        names = self.actor_names()
        self._names = names
        # The ranks are the actors named, whatever --num-gpus says: the engine routes and probes that many.
        self.od_config.num_gpus = len(names)
        self.actor_labels = [f"Ray actor '{name}'" for name in names]
        self.worker_handles.extend(self._find_actor(name) for name in names)
        self.worker_info = self._initialize(dict(enumerate(self.worker_handles)))

    def actor_names(self) -> list[str]:
        names = self.od_config.worker_actor_names
        if names is None:
            names = [name.strip() for name in os.environ.get(ACTOR_NAMES_ENV, "").split(",") if name.strip()]
        if not names:
            raise WorkerStartupError(
                f"no worker actors to connect to: set {ACTOR_NAMES_ENV} or --worker-actor-names "
                "to the Ray actor names, in rank order"
            )
        return names

    def namespace(self) -> str:
        """The Ray namespace the actors are looked up in."""
        return self.od_config.ray_namespace or ray.get_runtime_context().namespace

    def _find_actor(self, name: str) -> ray.actor.ActorHandle:
        try:
            return ray.get_actor(name, namespace=self.od_config.ray_namespace)
        except ValueError:
            named = ray.util.list_named_actors(all_namespaces=True)
            listing = ", ".join(f"'{a['name']}' (namespace '{a['namespace']}')" for a in named) or "none"
            raise WorkerStartupError(
                f"Failed to find Ray actor '{name}' in namespace '{self.namespace()}'. "
                f"Named actors in the cluster: {listing}. Check {ACTOR_NAMES_ENV} / --worker-actor-names "
                "and --ray-namespace."
            ) from None

    def _initialize(
        self, handles: dict[int, ray.actor.ActorHandle], group_addresses: dict[int, str] | None = None
    ) -> list[dict]:
        """Load (or confirm) the model on each ``rank: actor`` and check the actors form one set of ranks;
        ``group_addresses`` (rank -> host:port) tells actors we launched where their rank group meets.

        Returns the actors' ready replies (model description, ``num_ranks``, ``node_id``) in rank order.
        """
        timeout = self.od_config.worker_start_timeout_s
        addresses = group_addresses or {}
        try:
            replies = self._call_ranks(
                handles,
                lambda rank, handle: handle.initialize.remote(addresses.get(rank)),
                "initialize",
                timeout,
                error_replies_raise=False,
            )
        except RpcTimeoutError as error:
            raise WorkerStartupError(f"workers did not load their model within {timeout:g}s: {error}") from error
        except ExecutorError as error:
            raise WorkerStartupError(f"workers failed to start: {error}") from error
        for rank, reply in sorted(replies.items()):
            if reply["status"] != "ready":
                raise WorkerStartupError(f"Worker rank {rank} failed to initialize: {reply['error']}")
            if reply["rank"] != rank:
                raise WorkerStartupError(
                    f"{self.actor_labels[rank]} is rank {reply['rank']} but is listed at position {rank}: "
                    "list the actors in rank order"
                )
            if reply["num_ranks"] != len(self.worker_handles):
                raise WorkerStartupError(
                    f"{self.actor_labels[rank]} was configured for {reply['num_ranks']} ranks (num_gpus) "
                    f"but the executor has {len(self.worker_handles)} workers"
                )
            check_rank_group(self.od_config, reply, self.actor_labels[rank])
        for rank, handle in handles.items():
            self._set_up_rank(rank, partial(self._call_one, rank, handle, timeout=timeout))
        return [reply for _, reply in sorted(replies.items())]

    def _call_one(self, rank: int, handle: ray.actor.ActorHandle, method: str, args: tuple, timeout: float) -> Any:
        return self._call_ranks({rank: handle}, lambda _, h: h.execute_rpc.remote(method, args), method, timeout)[rank]

    # -- transport ---------------------------------------------------------------------------------
    def _forward_rpc_to_workers(
        self, method: str, timeout: float, args: tuple, kwargs: dict, unique_reply_rank: int | None
    ) -> Any:
        # Every serving rank runs the call (a step is one broadcast); only the reply choice differs.
        # Streamed, so the partial images a step decodes arrive while it runs.
        replies = self._call_ranks(
            {rank: self.worker_handles[rank] for rank in self.serving_ranks()},
            lambda _, handle: handle.execute_rpc_streaming.remote(method, args, kwargs),
            method,
            timeout,
        )
        return [replies[rank] for rank in sorted(replies)] if unique_reply_rank is None else replies[unique_reply_rank]

    def _check_worker_health(self) -> None:
        # get_rank runs in the actor's own health thread, so a busy worker still answers at once.
        ranks = self._call_ranks(
            {rank: self.worker_handles[rank] for rank in self.serving_ranks()},
            lambda _, handle: handle.get_rank.remote(),
            "get_rank",
            HEALTH_CHECK_TIMEOUT_S,
        )
        for position, rank in sorted(ranks.items()):
            if rank != position:
                raise WorkerDiedError(
                    f"{self.actor_labels[position]} answers as rank {rank}, expected {position}", (position,)
                )

    def cancel_requests(self, request_ids: list[str]) -> None:
        for handle in self.worker_handles:
            handle.cancel.remote(list(request_ids))  # fire and forget: a dead actor has nothing to cancel

    def _disconnect_from_workers(self) -> None:
        # The actors are not ours: drop the handles, never kill.
        self.worker_handles = []
        release_ray(self._owns_ray_connection)
        self._owns_ray_connection = False

    def _on_actor_death(self, rank: int, handle: ray.actor.ActorHandle, reason: str) -> None:
        """Called when a call finds ``handle`` (rank's actor) dead. Its owner replaces it, not us: the
        engine sets the rank's group aside, and ``recover_ranks`` connects to the new actor of that name."""

    def probe_ranks(self, ranks: range, timeout: float) -> dict[int, str]:
        # is_initialized, not get_rank: an actor that Ray restarted in place answers get_rank without its model.
        failed = {}
        try:
            answers = self._call_ranks(
                {rank: self.worker_handles[rank] for rank in ranks},
                lambda _, handle: handle.is_initialized.remote(),
                "is_initialized",
                timeout,
            )
        except ExecutorError as error:
            return {rank: str(error) for rank in (error.ranks or ranks)}
        for rank, initialized in answers.items():
            if not initialized:
                failed[rank] = f"worker rank {rank} ({self.actor_labels[rank]}) was restarted and has no model loaded"
        return failed

    def recover_ranks(self, ranks: range, timeout: float) -> bool:
        """The actor of each rank's name, a new one or one Ray restarted in place, loads the model again (and
        replays the set-up calls) before it serves: True when the whole group is back."""
        handles = {}
        for rank in ranks:
            try:
                handles[rank] = ray.get_actor(self._names[rank], namespace=self.od_config.ray_namespace)
            except ValueError:
                return False  # not back yet
        try:
            infos = self._initialize(handles)
        except ExecutorError as error:
            logger.info("worker rank %s is not back yet: %s", ", ".join(map(str, ranks)), error)
            return False
        for (rank, handle), info in zip(sorted(handles.items()), infos):
            self.worker_handles[rank] = handle
            self.worker_info[rank] = info
        logger.info("worker rank %s: initialized again (%s)", ", ".join(map(str, ranks)), self.actor_labels[ranks[0]])
        return True

    def _call_ranks(
        self,
        handles: dict[int, ray.actor.ActorHandle],
        submit: Callable[[int, ray.actor.ActorHandle], ray.ObjectRef | ray.ObjectRefGenerator],
        method: str,
        timeout: float,
        error_replies_raise: bool = True,
    ) -> dict[int, Any]:
        """Submit one call per ``rank: actor`` (``submit(rank, actor)``), then collect ``rank: reply``.

        Raises at the first failure rather than waiting for every rank; an actor's error dict
        becomes WorkerRpcError unless ``error_replies_raise`` is False. Large replies travel
        through Ray's object store (Ray stores any return value over ~100 KiB there). A streamed
        call's progress (partial images, steps) is reported as it comes; its last item is the reply.
        """
        deadline = time.monotonic() + timeout
        pending = {submit(rank, handle): (rank, handle) for rank, handle in handles.items()}
        replies: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                # The late replies are dropped with their refs; the actors keep serving.
                ranks = tuple(sorted(rank for rank, _ in pending.values()))
                raise RpcTimeoutError(
                    f"RPC '{method}' timed out after {timeout:g}s waiting for rank {', '.join(map(str, ranks))}", ranks
                )
            for call in ready:
                rank, handle = pending[call]
                ref = next(call) if isinstance(call, ray.ObjectRefGenerator) else call
                value = self._reply(ref, method, rank, handle, error_replies_raise)
                if isinstance(value, WorkerProgress):
                    self._report_progress(value)
                    continue
                del pending[call]
                replies[rank] = value
        return replies

    def _reply(
        self, ref: ray.ObjectRef, method: str, rank: int, handle: ray.actor.ActorHandle, error_replies_raise: bool
    ) -> Any:
        try:
            value = ray.get(ref)
        except RayActorError as error:
            reason = f"worker rank {rank} ({self.actor_labels[rank]}) is dead: {_first_line(error)}"
            self._on_actor_death(rank, handle, reason)
            raise WorkerDiedError(reason, (rank,)) from error
        except RayTaskError as error:
            raise WorkerRpcError(f"worker rank {rank}: RPC '{method}' raised {_first_line(error.cause)}") from error
        except RayError as error:
            raise WorkerRpcError(f"worker rank {rank}: RPC '{method}' failed: {_first_line(error)}") from error
        if error_replies_raise and is_error_reply(value):
            raise WorkerRpcError(f"worker rank {rank}: {value['error']}")
        return value


def _first_line(error: BaseException | None) -> str:
    """An exception in one line; Ray's multi-line messages keep their first and last lines (the reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(dict.fromkeys(lines[:1] + lines[-1:]))
    return f"{type(error).__name__}: {text}"
