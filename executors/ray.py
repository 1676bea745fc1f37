"""RayDiffusionExecutor ("ray"): the engine launches its own worker actors, on one node or many.

One placement group holds one bundle per rank ({"GPU": 1}, or {"CPU": ray_cpus_per_worker} on a
cluster without GPUs, plus any ray_rank_resources for that rank); rank r's actor runs in bundle r.
Everything after the launch (forwarding, health, errors) is RayExternalDiffusionExecutor's; only
the lifecycle differs: these actors are ours, so a dead one is reported to the engine, which may
have it replaced (restart_worker), and closing the engine kills them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

try:
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as error:  # Ray is an optional extra
    raise ImportError("the Ray backends need Ray: pip install 'imagegen[ray]'") from error

from executors.base import DiffusionExecutor, WorkerStartupError
from executors.ray_external import RayDiffusionWorkerActor, RayExternalDiffusionExecutor, connect_ray, release_ray
from workers.hosts.ray_actor import MAX_CONCURRENT_CALLS

__all__ = ["RayDiffusionExecutor"]

logger = logging.getLogger(__name__)

# How long actors get to leave by themselves (after their current call) before they are killed.
_GRACEFUL_EXIT_S = 5.0
# When a placement group still waits for resources after this long, say so in the log.
_PLACEMENT_WARNING_S = 10.0


class RayDiffusionExecutor(RayExternalDiffusionExecutor):
    """Launches ``num_gpus`` RayDiffusionWorkerActors and kills them on shutdown.

    Joins ``ray_address`` / ``RAY_ADDRESS``, or starts a private local Ray when neither is set.
    """

    _placement_group: PlacementGroup | None = None

    def _connect_to_workers(self) -> None:
        config = self.od_config
        num_ranks = config.num_gpus
        self._lock = threading.Lock()  # guards _restarting and _reported_dead
        self._restarting: set[int] = set()
        self._reported_dead: set[int] = set()  # id() of actor handles already reported dead
        self._owns_ray_connection = connect_ray(config, start_local=True)
        extra = config.ray_rank_resources or [{} for _ in range(num_ranks)]
        if len(extra) != num_ranks:
            raise WorkerStartupError(
                f"ray_rank_resources has {len(extra)} entries but num_gpus is {num_ranks}: give one per rank"
            )
        use_gpus = self._use_gpus()
        self._rank_resources = extra
        self._num_gpus = 1 if use_gpus else 0
        self._num_cpus = 0 if use_gpus else config.ray_cpus_per_worker
        bundles = [
            {**({"GPU": 1} if use_gpus else {"CPU": self._num_cpus}), **extra[rank]} for rank in range(num_ranks)
        ]

        # 1. Reserve every rank's resources at once, so a partial set of workers never starts.
        self._check_feasible(bundles)
        self._placement_group = placement_group(bundles, strategy=config.ray_placement_strategy)
        if not self._wait_for_placement_group(config.worker_start_timeout_s, bundles):
            raise WorkerStartupError(
                f"Ray could not reserve {bundles} ({config.ray_placement_strategy}) within "
                f"{config.worker_start_timeout_s:g}s; available now: {ray.available_resources()}"
            )
        # 2. One actor per bundle, rank r in bundle r (and on the node that offers extra[r]).
        self.actor_labels = [f"Ray actor of rank {rank}" for rank in range(num_ranks)]
        self.worker_handles.extend(self._launch(rank) for rank in range(num_ranks))
        # 3. Load the model everywhere, each rank group meeting on its leader's node.
        handles = dict(enumerate(self.worker_handles))
        self.worker_info = self._initialize(handles, self._group_addresses(handles))
        logger.info("launched %d Ray worker actor(s) in bundles %s", num_ranks, bundles)

    def _launch(self, rank: int) -> ray.actor.ActorHandle:
        return RayDiffusionWorkerActor.options(
            num_gpus=self._num_gpus,
            num_cpus=self._num_cpus,
            resources=self._rank_resources[rank],
            max_concurrency=max(MAX_CONCURRENT_CALLS, self.od_config.step_mode_room + 4),
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._placement_group, placement_group_bundle_index=rank
            ),
        ).remote(rank=rank, od_config=self.od_config)

    def _group_addresses(self, handles: dict[int, ray.actor.ActorHandle]) -> dict[int, str]:
        """rank -> where its rank group meets: a free port on the node of the group's leader (the first rank)."""
        size = self.od_config.rank_group_size
        if size == 1:
            return {}
        leaders = {rank: handle.free_address.remote() for rank, handle in handles.items() if rank % size == 0}
        addresses = dict(zip(leaders, ray.get(list(leaders.values()), timeout=self.od_config.worker_start_timeout_s)))
        return {rank: addresses[rank - rank % size] for rank in handles}

    def _wait_for_placement_group(self, timeout: float, bundles: list[dict[str, float]]) -> bool:
        deadline = time.monotonic() + timeout
        ready_ref = self._placement_group.ready()
        ready, _ = ray.wait([ready_ref], timeout=min(timeout, _PLACEMENT_WARNING_S))
        if not ready:
            logger.warning(
                "waiting up to %gs for Ray to reserve %s; available now: %s",
                timeout,
                bundles,
                ray.available_resources(),
            )
            ready, _ = ray.wait([ready_ref], timeout=max(0.0, deadline - time.monotonic()))
        return bool(ready)

    def _use_gpus(self) -> bool:
        if self.od_config.device != "auto":
            return self.od_config.device == "cuda"
        return ray.cluster_resources().get("GPU", 0) > 0

    def _check_feasible(self, bundles: list[dict[str, float]]) -> None:
        """Fail at once, rather than after worker_start_timeout_s, when the cluster can never fit the bundles."""
        needed: Counter = Counter()
        for bundle in bundles:
            needed.update(bundle)
        total = ray.cluster_resources()
        short = {name: amount for name, amount in needed.items() if total.get(name, 0) < amount}
        if short:
            raise WorkerStartupError(
                f"the Ray cluster cannot hold {len(bundles)} worker(s) as {bundles}: it has "
                f"{ {name: total.get(name, 0) for name in short} } of {short} (see ray_cpus_per_worker, "
                "ray_rank_resources and num_gpus)"
            )

    # -- failures ----------------------------------------------------------------------------------
    def _on_actor_death(self, rank: int, handle: ray.actor.ActorHandle, reason: str) -> None:
        # Our actor: tell the engine (once per actor), whose on_worker_death policy decides.
        with self._lock:
            if self.is_closed or id(handle) in self._reported_dead:
                return
            self._reported_dead.add(id(handle))
        logger.error(reason)
        self._report_worker_death(rank, reason)

    # Our actors are replaced, not found again by name.
    recover_ranks = DiffusionExecutor.recover_ranks

    def restart_worker(self, rank: int) -> None:
        """Kill rank's actor (dead or hung) and start a new one in the same bundle; in a rank group, the
        whole group's, which meets anew (the survivors' process group waits for a peer that is gone)."""
        ranks = self.od_config.rank_group_of(rank)
        with self._lock:
            if self.is_closed or self._restarting.intersection(ranks):
                return
            self._restarting.update(ranks)
        try:
            # A hung actor still holds its bundle: it must go before the new one can start there.
            for member in ranks:
                ray.kill(self.worker_handles[member], no_restart=True)
            news = {member: self._launch(member) for member in ranks}
            try:
                infos = self._initialize(news, self._group_addresses(news))
            except BaseException:
                for new in news.values():
                    ray.kill(new, no_restart=True)
                raise
            if self.is_closed:
                for new in news.values():
                    ray.kill(new, no_restart=True)
                return
            for (member, new), info in zip(news.items(), infos):
                self.worker_handles[member] = new
                self.worker_info[member] = info
            logger.info("worker rank %s restarted", ", ".join(map(str, ranks)))
        finally:
            with self._lock:
                self._restarting.difference_update(ranks)

    # -- shutdown ----------------------------------------------------------------------------------
    def _disconnect_from_workers(self) -> None:
        handles, self.worker_handles = self.worker_handles, []
        # These actors are ours: ask each to leave after its current call, then kill the stragglers.
        if handles and ray.is_initialized():
            exits = [handle.__ray_terminate__.remote() for handle in handles]
            ray.wait(exits, num_returns=len(exits), timeout=_GRACEFUL_EXIT_S)
            for handle in handles:
                ray.kill(handle, no_restart=True)
        if self._placement_group is not None and ray.is_initialized():
            remove_placement_group(self._placement_group)
        self._placement_group = None
        release_ray(self._owns_ray_connection)
        self._owns_ray_connection = False
