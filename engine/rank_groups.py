"""RankGroups: which of an engine's rank groups serve, restart or are set aside, and the probe that
brings set-aside groups back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from engine import metrics
from engine.errors import NoServingGroupError
from executors import DiffusionExecutor
from workers.config import OmniDiffusionConfig

logger = logging.getLogger(__name__)

# The states of a rank group (metric imagegen_rank_groups): it serves, or gets no calls while it is
# replaced (restarting) or after a failure it could not be repaired from (set_aside, probed until it answers).
SERVING, RESTARTING, SET_ASIDE = "serving", "restarting", "set_aside"


class RankGroups:
    """The rank groups of one engine and their states; the executor keeps the ranks out of service.

    A group whose rank fails is restarted in the background where the backend owns its workers, else
    set aside (``on_worker_death`` "exit" turns the engine fatal instead, through ``turn_fatal``). A
    background probe checks every group each ``health_check_interval_s``: a serving group that fails
    its probe is taken out of service, and a set-aside group that answers again (one interval after it
    was set aside at the soonest) is initialized anew and re-admitted.
    """

    def __init__(
        self, executor: DiffusionExecutor, od_config: OmniDiffusionConfig, turn_fatal: Callable[[str], None]
    ):
        self._executor = executor
        self._od_config = od_config
        self._turn_fatal = turn_fatal
        self._lock = threading.Lock()
        self._probing = threading.Lock()  # one probe pass at a time
        self._stopped = threading.Event()
        # Leader rank -> when its group was set aside: it is probed for re-admission one interval later at the
        # soonest, so a worker that is about to say it hangs (its call's deadline just passed) cannot slip back.
        self._set_aside_at: dict[int, float] = {}
        for rank in range(od_config.num_gpus):
            metrics.WORKER_UP.labels(od_config.model_name, str(rank)).set(1)
        self._count()

    def start_probing(self) -> None:
        threading.Thread(target=self._probe_every_interval, name="imagegen-probe", daemon=True).start()

    def stop(self) -> None:
        """No more failures handled nor probes run (the engine closes or turned fatal)."""
        self._stopped.set()

    # -- states ------------------------------------------------------------------------------------
    def states(self) -> dict[int, tuple[str, str | None]]:
        """Each rank group's (state, reason): SERVING, RESTARTING or SET_ASIDE, and why it is out of service."""
        out = self._executor.out_of_service()
        states: dict[int, tuple[str, str | None]] = {}
        for group in range(self._od_config.num_rank_groups):
            found = [out[rank] for rank in self._ranks(group) if rank in out]
            states[group] = found[0] if found else (SERVING, None)
        return states

    def serving(self) -> list[int]:
        return [group for group, (state, _) in self.states().items() if state == SERVING]

    def restarting(self) -> bool:
        return any(state == RESTARTING for state, _ in self.states().values())

    def set_aside_ranks(self) -> dict[int, str]:
        """rank -> why, for every rank of a set-aside group (what /health lists)."""
        return {rank: reason for rank, (state, reason) in self._executor.out_of_service().items() if state == SET_ASIDE}

    def no_serving_error(self) -> NoServingGroupError:
        reasons = "; ".join(dict.fromkeys(self.set_aside_ranks().values())) or "no rank group serves"
        return NoServingGroupError(f"no worker can serve now: {reasons}")

    def _ranks(self, group: int) -> range:
        size = self._od_config.rank_group_size
        return range(group * size, (group + 1) * size)

    def _count(self) -> None:
        states = [state for state, _ in self.states().values()]
        for state in (SERVING, RESTARTING, SET_ASIDE):
            metrics.RANK_GROUPS.labels(self._od_config.model_name, state).set(states.count(state))

    # -- failures ----------------------------------------------------------------------------------
    def on_failed(self, ranks: tuple[int, ...], reason: str) -> None:
        """Apply ``on_worker_death`` to each failed rank's group: restart it in the background where the backend
        can, else set it aside (or turn fatal under "exit"). A group out of service already is left as it is."""
        model_name = self._od_config.model_name
        # Each group with the first of its ranks that failed: the executor names that one as the cause.
        failed_ranks = {self._od_config.rank_group_of(rank): rank for rank in reversed(ranks)}
        for group, failed_rank in failed_ranks.items():
            for member in group:
                metrics.WORKER_UP.labels(model_name, str(member)).set(0)
            if self._od_config.on_worker_death == "exit":
                self._turn_fatal(reason)
                return
            restart = self._executor.can_restart_workers
            with self._lock:
                if self._stopped.is_set() or any(rank in self._executor.out_of_service() for rank in group):
                    continue
                self._take_out(group, RESTARTING if restart else SET_ASIDE, reason)
            if restart:
                threading.Thread(
                    target=self._restart, args=(failed_rank, group), name=f"imagegen-restart-{failed_rank}", daemon=True
                ).start()
            else:
                logger.error("rank group of rank %s set aside: %s", ", ".join(map(str, group)), reason)

    def _take_out(self, ranks: range, state: str, reason: str) -> None:
        self._executor.take_out_of_service(ranks, state, reason)
        self._set_aside_at[ranks[0]] = time.monotonic()
        self._count()

    def _restart(self, rank: int, ranks: range) -> None:
        try:
            self._executor.restart_worker(rank)
        except Exception as error:  # noqa: BLE001 - the group waits for the probe to try again
            reason = f"worker rank {', '.join(map(str, ranks))} could not be restarted: {error}"
            logger.error("rank group set aside: %s", reason)
            self._take_out(ranks, SET_ASIDE, reason)
        else:
            self._return_to_service(ranks)

    def _return_to_service(self, ranks: range) -> None:
        self._executor.return_to_service(ranks)
        metrics.WORKER_RESTARTS.labels(self._od_config.model_name).inc(len(ranks))
        for member in ranks:
            metrics.WORKER_UP.labels(self._od_config.model_name, str(member)).set(1)
        self._count()

    # -- the probe ---------------------------------------------------------------------------------
    def _probe_every_interval(self) -> None:
        while not self._stopped.wait(self._od_config.health_check_interval_s):
            try:
                self.probe()
            except Exception:  # noqa: BLE001 - the probe must outlive any one failure
                logger.exception("the rank-group probe failed")

    def probe(self) -> None:
        """One probe pass: serving groups that answer no health probe are taken out of service, set-aside
        groups that answer again are initialized anew (adapters replayed, group formed) and re-admitted.
        Each probe waits at most half the interval."""
        if self._stopped.is_set() or not self._probing.acquire(blocking=False):
            return
        try:
            interval = self._od_config.health_check_interval_s
            for group, (state, _) in self.states().items():
                ranks = self._ranks(group)
                if state == SERVING:
                    failed = self._executor.probe_ranks(ranks, interval / 2)
                    if failed:
                        self.on_failed(tuple(failed), "; ".join(failed.values()))
                elif (
                    state == SET_ASIDE
                    and time.monotonic() - self._set_aside_at.get(ranks[0], 0.0) >= interval
                    and self._recover(ranks, interval / 2)
                ):
                    logger.info("rank group of rank %s answers again: re-admitted", ", ".join(map(str, ranks)))
                    self._return_to_service(ranks)
        finally:
            self._probing.release()

    def _recover(self, ranks: range, timeout: float) -> bool:
        try:
            return self._executor.recover_ranks(ranks, timeout)
        except Exception as error:  # noqa: BLE001 - it stays aside; the next probe tries again
            logger.error("rank group of rank %s is still aside: %s", ", ".join(map(str, ranks)), error)
            return False
