"""RunningSetRoom: what step mode knows of the workers' running sets, so that a request is sent when it
would run at once and to the rank group where it would."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from workers.data import OmniDiffusionRequest, deadline_of, late_room


@dataclass
class _Placed:
    group: int
    images: int
    deadline: int  # in its group's iterations, as the worker sets it (workers.data.deadline_of)
    finishing: bool = False  # it has its last steps (workers.data.FINISHING_STEPS)


class RunningSetRoom:
    """Step mode: the requests placed in each rank group's running set and not answered yet.

    A worker's running set (workers.runtime.step_batching.RunningSet) gives each request a deadline (the
    iteration it arrived at plus its step count, plus the steps it may wait for its room: workers.data.deadline_of),
    and runs the earliest deadlines first, up to
    ``max_batch_size`` images per iteration (those past their deadline, up to half of it while others
    wait); the others pause. Here each group's iterations are counted from its RunningSetIteration
    reports, so the same deadlines are known: a request fits a group when the images due no later than
    it, and its own, fit in one iteration (a larger request, when nothing is due before it). It is then
    sent and runs at the group's next iteration: the fair queue, not a worker's own queue, decides whose
    request runs next, and a short request still overtakes long ones. A request's room frees as its last
    two steps begin (the worker names it finishing) or when it is answered.

    Thread-safe: the scheduler asks and places, steps are answered, and iterations come from executor threads.
    """

    def __init__(self, max_images: int, num_groups: int):
        self._max_images = max_images
        self._iterations = [0] * num_groups  # RunningSetIteration reports seen from each group
        self._placed: dict[str, _Placed] = {}  # request id -> where it went and when it is due
        self._lock = threading.Lock()

    def choose(self, requests: list[OmniDiffusionRequest], groups: Iterable[int]) -> tuple[int, bool]:
        """The group among ``groups`` for ``requests``, and whether they run there at its next iteration: a
        group where they do, the one with the fewest images running first (so that nothing pauses for them
        where it need not), else the one with the fewest images due before them."""
        with self._lock:
            return self._choose(requests, groups)

    def place(self, requests: list[OmniDiffusionRequest], groups: Iterable[int]) -> int:
        """Count ``requests`` in a group's running set: the one they were placed in already, while it is among
        ``groups``, else the one ``choose`` gives. Returns that group."""
        groups = list(groups)
        with self._lock:
            placed = self._placed.get(requests[0].request_id)
            if placed is not None and placed.group in groups:
                return placed.group
            group, _ = self._choose(requests, groups)
            deadline = self._deadline(group, requests)
            for request in requests:
                self._placed[request.request_id] = _Placed(group, request.num_images, deadline)
            return group

    def iteration(self) -> int:
        """Iterations of the busiest group so far: the clock of the deadlines of requests still queued."""
        with self._lock:
            return max(self._iterations)

    def iterated(self, group: int, finishing: Iterable[str]) -> None:
        """``group``'s running set ran an iteration, after which the ``finishing`` requests have their last steps."""
        with self._lock:
            self._iterations[group] += 1
            for request_id in finishing:
                if (placed := self._placed.get(request_id)) is not None:
                    placed.finishing = True

    def answered(self, request_ids: Iterable[str]) -> None:
        """These requests left their running sets (or never reached one)."""
        with self._lock:
            for request_id in request_ids:
                self._placed.pop(request_id, None)

    def _choose(self, requests: list[OmniDiffusionRequest], groups: Iterable[int]) -> tuple[int, bool]:
        images = sum(request.num_images for request in requests)
        choices = []
        for group in groups:
            due = self._due(group, self._deadline(group, requests))
            fits = not due or due + images <= self._max_images
            choices.append((not fits, self._due(group, None), due, group))
        refused, _, _, group = min(choices)
        return group, not refused

    def _deadline(self, group: int, requests: list[OmniDiffusionRequest]) -> int:
        return deadline_of(self._iterations[group], min(request.num_inference_steps for request in requests))

    def _due(self, group: int, deadline: int | None) -> int:
        """Images in ``group``'s running set that run before a request due at ``deadline`` (None: all of them)
        and stay after this iteration: those on time and due first, and those past their deadline up to
        the share of a call they take while others wait (workers.data.late_room)."""
        now = self._iterations[group]
        late = on_time = 0
        for placed in self._placed.values():
            if placed.group != group or placed.finishing:
                continue
            if placed.deadline <= now:
                late += placed.images
            elif deadline is None or placed.deadline <= deadline:
                on_time += placed.images
        return on_time + (late if deadline is None else min(late, late_room(self._max_images)))
