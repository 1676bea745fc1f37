"""AsyncDiffusionEngine: the asyncio front of DiffusionEngine that forms batches from concurrent requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from engine import metrics
from engine.engine import DiffusionEngine, DiffusionOutput, PartialImages
from engine.errors import EngineDeadError, EngineOverloadedError, RequestTimeoutError
from engine.fair_queue import FairQueue
from workers.config import LoraModule
from workers.data import OmniDiffusionRequest, StepProgress, deadline_of

logger = logging.getLogger(__name__)

# Steps in flight at once. A second step is sent only when it is full, so it waits at the workers
# while the first runs and they never idle between steps; a partial batch waits for the first to end.
# In step mode each step is one request, sent when a rank group's running set would run it at its next
# iteration (engine.running_sets.RunningSetRoom: max_batch_size images each, earliest deadline first), so that
# the fair queue, not the workers' own queues, decides whose request runs next. A request's room frees as its
# last two denoising steps begin (the worker says so): the next request then reaches the worker while they
# run, and joins the running set as it leaves, not one round trip later.
PIPELINE_DEPTH = 2
# While a worker restarts, how often the scheduler looks whether the engine is ready again.
_READINESS_POLL_S = 0.1


# How much each request that leaves the queue moves the estimate of the queue time (see queue_room).
_QUEUE_TIME_WEIGHT = 0.2


@dataclass(eq=False)
class _Queued:
    request: OmniDiffusionRequest
    future: asyncio.Future
    deadline: float
    key: str = ""
    enqueued_at: float = field(default_factory=time.monotonic)
    # Step mode: its deadline (workers.data.deadline_of) from the running sets' iteration it was queued at.
    deadline_iteration: int = 0

    @property
    def images(self) -> int:
        return self.request.num_images


@dataclass(frozen=True)
class QueueRoom:
    """A key's share of the queue: ``limit`` images (--max-queued-images-per-key), ``remaining`` of them
    free, and ``reset_s``, the seconds until one more frees (0 while one is free; else an estimate)."""

    limit: int
    remaining: int
    reset_s: float


class AsyncDiffusionEngine:
    """Queues requests and runs them in steps of up to ``max_batch_size`` images per worker.

    With the workers idle, a step leaves when it is full or when its oldest request has waited
    ``batch_timeout_ms`` (0 by default: at once, so one request alone waits for nobody); while a step runs,
    the next leaves only when full or when the running step ends. A step holds only requests that can share
    pipeline calls (same size, steps, ...).
    ``step()`` runs in a thread, so the event loop never blocks on generation. With ``--scheduling
    step`` (engine.scheduling) each request is a step of its own, sent as soon as a rank group's running set
    would run it at its next iteration (engine.running_sets.RunningSetRoom: ``max_batch_size`` images each,
    earliest deadline first): they batch them at every denoising step, and each returns when it is done.

    Fair share: each request comes with a key (who sent it; the server decides), and the queue
    (engine.fair_queue.FairQueue) serves the keys in turn, each in arrival order; a step still fills up
    with compatible requests of several keys. In both scheduling modes.

    Admission: more than ``max_queue_size`` queued images, or more than ``queued_images_per_key`` of
    one key (a key with nothing queued may always queue one request), is EngineOverloadedError (429);
    ``queue_room(key)`` tells a key its share. A request still queued after ``request_timeout_s`` is
    RequestTimeoutError (504) and never runs; while a worker restarts, requests wait in the queue.

    ``stream()`` is ``generate()`` that also yields the request's progress (partial images, steps) as it comes.

    LoRA adapters load and unload here at run time: an adapter being unloaded is refused at once
    (404), and leaves the workers once its queued and running requests are done.
    """

    def __init__(self, engine: DiffusionEngine):
        self.engine = engine
        self._model_name = engine.od_config.model_name
        config = engine.od_config
        self._step_capacity = config.max_batch_size * config.num_rank_groups
        self._step_mode = engine.scheduling == "step"
        depth = config.step_mode_room * config.num_rank_groups if self._step_mode else PIPELINE_DEPTH
        self._max_queue_size = config.max_queue_size
        self._max_images_per_key = config.queued_images_per_key
        self._request_timeout_s = config.request_timeout_s
        self.draining = False
        self._batch_timeout_s = engine.od_config.batch_timeout_ms / 1000
        self._queue: FairQueue[_Queued] = FairQueue()
        # Seconds requests waited in the queue lately (a moving average), for queue_room's estimate.
        self._recent_queue_time_s = 0.0
        self._changed = asyncio.Event()  # a request arrived or a step ended
        self._free_slots = asyncio.Semaphore(depth)
        self._threads = ThreadPoolExecutor(depth, thread_name_prefix="imagegen-step")
        self._steps: set[asyncio.Task] = set()
        self._scheduler: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # request_id -> the queue of stream() waiting for that request's progress.
        self._progress: dict[str, asyncio.Queue[PartialImages | StepProgress | None]] = {}
        # LoRA adapter name -> the requests queued or running with it; an unload waits for its count to reach 0.
        self._lora_in_flight: Counter[str] = Counter()
        self._lora_done = asyncio.Event()
        self._waiting = metrics.REQUESTS_WAITING.labels(self._model_name)
        self._running = metrics.REQUESTS_RUNNING.labels(self._model_name)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._scheduler = self._loop.create_task(self._schedule(), name="imagegen-scheduler")
        self.engine.progress_listeners.append(self._on_progress)
        self.engine.finishing_listeners.append(self._on_finishing)

    async def close(self) -> None:
        """Stop scheduling, let running steps finish, fail what is still queued (and refuse what comes later:
        nothing waits on a queue nobody schedules)."""
        self.draining = True
        if self._scheduler is not None:
            self._scheduler.cancel()
            self.engine.progress_listeners.remove(self._on_progress)
            self.engine.finishing_listeners.remove(self._on_finishing)
        if self._steps:
            await asyncio.wait(self._steps)
        self._fail_queued(EngineDeadError("the server is shutting down"))
        self._threads.shutdown(wait=False)

    def start_draining(self) -> None:
        """Refuse new requests (503); queued and running ones still finish."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running, at most ``timeout_s``; True if it got there."""
        deadline = time.monotonic() + timeout_s
        while self._queue or self._steps:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    def queue_room(self, key: str) -> QueueRoom:
        """``key``'s share of the queue now. The seconds until a place frees are an estimate: how long
        requests waited in the queue lately, less how long the key's oldest queued request has waited."""
        queued = self._queue.images(key)
        reset_s = 0.0
        if queued >= self._max_images_per_key:
            waited_s = time.monotonic() - self._queue.oldest(key).enqueued_at
            reset_s = max(0.0, self._recent_queue_time_s - waited_s)
        return QueueRoom(self._max_images_per_key, max(0, self._max_images_per_key - queued), reset_s)

    async def generate(self, request: OmniDiffusionRequest, key: str = "") -> DiffusionOutput:
        """Validate, queue and wait for ``request``, sent by ``key`` (see the class docstring). Raises the
        engine's errors."""
        prepared = self.engine.prepare(request)
        if self.draining:
            raise EngineDeadError("the server is shutting down")
        if self.engine.fatal_error is not None:
            raise EngineDeadError(self.engine.fatal_error)
        self._admit(key, prepared.num_images)
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        queued = _Queued(
            prepared, loop.create_future(), deadline=now + self._request_timeout_s, key=key, enqueued_at=now,
            deadline_iteration=deadline_of(self.engine.running_sets.iteration(), prepared.num_inference_steps),
        )
        self._queue.append(queued)
        self._waiting.inc()
        self._changed.set()
        # On time even while every slot is taken and the scheduler waits for one, not for the queue.
        expiry = loop.call_later(self._request_timeout_s, self._expire_overdue, queued.deadline)
        # Every adapter of the request: none of them may be unloaded under it.
        lora_names = [lora.name for lora in prepared.loras]
        self._lora_in_flight.update(lora_names)
        try:
            return await queued.future
        except asyncio.CancelledError:
            metrics.REQUESTS_CANCELLED.labels(self._model_name).inc()
            if queued not in self._queue:  # already in a step: the workers can stop early
                self.engine.cancel([queued.request.request_id])
            raise
        finally:
            expiry.cancel()
            if queued in self._queue:  # cancelled while still queued: it must not run
                self._queue.remove(queued)
                self._waiting.dec()
            if lora_names:
                self._lora_in_flight.subtract(lora_names)
                self._lora_done.set()

    def _admit(self, key: str, images: int) -> None:
        """Raise EngineOverloadedError when ``images`` more would overfill the queue or ``key``'s share of it."""
        if self._queue.images() + images > self._max_queue_size:
            refusal = f"The server is busy: {self._max_queue_size} images are already waiting."
        elif self._queue.images(key) and self._queue.images(key) + images > self._max_images_per_key:
            refusal = (
                f"You have {self._queue.images(key)} images waiting, and each client may have at most "
                f"{self._max_images_per_key} waiting at once."
            )
        else:
            return
        metrics.REQUESTS_REJECTED.labels(self._model_name).inc()
        raise EngineOverloadedError(f"{refusal} Retry shortly.")

    async def load_lora_adapter(self, adapter: LoraModule) -> dict:
        """Load ``adapter`` on every rank (see LoraRegistry.load); rank 0's report."""
        return await asyncio.to_thread(self.engine.loras.load, adapter)

    async def unload_lora_adapter(self, name: str) -> None:
        """Refuse new requests for adapter ``name`` now (NotFoundError when it is not served), let its queued
        and running requests finish, then remove it from every rank."""
        self.engine.loras.begin_unload(name)
        while self._lora_in_flight[name] > 0:
            self._lora_done.clear()
            await self._lora_done.wait()
        del self._lora_in_flight[name]
        await asyncio.to_thread(self.engine.loras.unload, name)

    async def stream(
        self, request: OmniDiffusionRequest, key: str = ""
    ) -> AsyncIterator[PartialImages | StepProgress | DiffusionOutput]:
        """generate(), yielding each of the request's PartialImages and StepProgress as soon as a
        worker has made it, and the DiffusionOutput last. Closing the iterator early cancels the request."""
        progress: asyncio.Queue[PartialImages | StepProgress | None] = asyncio.Queue()
        self._progress[request.request_id] = progress
        generation = asyncio.ensure_future(self.generate(request, key))
        # Runs after all the request's progress is queued: the workers send it before their
        # reply, and the threads that report it hand it to the loop before the step ends.
        generation.add_done_callback(lambda _: progress.put_nowait(None))
        try:
            while (item := await progress.get()) is not None:
                yield item
            yield generation.result()
        finally:
            generation.cancel()
            del self._progress[request.request_id]

    def _on_progress(self, item: PartialImages | StepProgress) -> None:
        # Called from an executor's or a step's thread.
        self._loop.call_soon_threadsafe(self._queue_progress, item)

    def _queue_progress(self, item: PartialImages | StepProgress) -> None:
        progress = self._progress.get(item.request_id)
        if progress is not None:  # else nobody streams it (any more)
            progress.put_nowait(item)

    def _on_finishing(self) -> None:
        # Called from an executor's thread: room frees in a running set.
        self._loop.call_soon_threadsafe(self._changed.set)

    def _fail_queued(self, error: Exception) -> None:
        if self._queue:
            self._changed.set()
        while self._queue:
            queued = self._queue.popleft()
            self._waiting.dec()
            if not queued.future.done():
                queued.future.set_exception(error)

    def _expire_overdue(self, now: float) -> None:
        for queued in [q for q in self._queue if q.deadline <= now]:
            self._changed.set()
            self._queue.remove(queued)
            self._waiting.dec()
            metrics.REQUESTS_TIMED_OUT.labels(self._model_name).inc()
            if not queued.future.done():
                waited = f"The request waited {self._request_timeout_s:g}s in the queue and was dropped."
                queued.future.set_exception(RequestTimeoutError(waited))

    # -- scheduling ------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            await self._free_slots.acquire()
            chosen = await self._wait_for_batch()
            batch = self._take_batch(chosen)
            task = asyncio.get_running_loop().create_task(self._run_step(batch))
            self._steps.add(task)
            task.add_done_callback(self._steps.discard)

    async def _wait_for_batch(self) -> _Queued | None:
        """Wait until a step may leave. Step mode: returns the request it sends (see _next_request), or None
        when the batch timeout sends the request whose turn it is regardless."""
        while True:
            now = time.monotonic()
            self._expire_overdue(now)
            timeout = None
            ready = self.engine.is_ready()
            if self._queue and not ready:
                # Not ready: wait while a worker restarts, but fail at once when the engine is dead.
                try:
                    await asyncio.to_thread(self.engine.check_health)
                except EngineDeadError as error:
                    self._fail_queued(error)
            if self._queue:
                chosen = self._next_request() if self._step_mode and ready else None
                step_ready = chosen is not None if self._step_mode else self._queue.images() >= self._step_capacity
                if ready and step_ready:
                    return chosen
                if not ready:
                    timeout = _READINESS_POLL_S
                elif not self._steps:
                    timeout = min(queued.enqueued_at for queued in self._queue) + self._batch_timeout_s - now
                    if timeout <= 0:
                        return chosen
                next_deadline = min(queued.deadline for queued in self._queue) - now
                timeout = next_deadline if timeout is None else min(timeout, next_deadline)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), None if timeout is None else max(timeout, 0))
            except TimeoutError:
                pass

    def _next_request(self) -> _Queued | None:
        """Step mode: the request whose turn it is when a rank group's running set would run it at once. Else,
        while it waits for room, the first queued request that would run at once and that the running set
        would run before it anyway (due earlier: it would finish sooner than the waiting one's deadline), so
        that a long request waiting for room does not hold up short ones that fit; none is due earlier once
        the waiting one has waited as long as its own steps, so it is never passed for ever."""
        turn = self._queue.peek()
        if self.engine.runs_at_once(turn.request):
            return turn
        now = self.engine.running_sets.iteration()
        for queued in self._queue.in_turn():
            due_earlier = deadline_of(now, queued.request.num_inference_steps) < turn.deadline_iteration
            if queued is not turn and due_earlier and self.engine.runs_at_once(queued.request):
                return queued
        return None

    def _take_batch(self, chosen: _Queued | None) -> list[_Queued]:
        """The next key's oldest request, then compatible ones from the keys in turn, up to the step's capacity.
        Step mode: ``chosen`` alone (else the request whose turn it is)."""
        if self._step_mode:  # its own call, answered as soon as it leaves the running set
            queued = chosen or self._queue.peek()
            self._queue.take(queued)
            self.engine.place([queued.request])  # counted there now: its step begins in a thread, later
            return [queued]
        return self._queue.take_batch(self._step_capacity, lambda queued: queued.request.batch_key())

    async def _run_step(self, batch: list[_Queued]) -> None:
        started = time.monotonic()
        self._waiting.dec(len(batch))
        self._running.inc(len(batch))
        for queued in batch:
            metrics.QUEUE_TIME.labels(self._model_name).observe(started - queued.enqueued_at)
            self._recent_queue_time_s += _QUEUE_TIME_WEIGHT * (
                started - queued.enqueued_at - self._recent_queue_time_s
            )
        metrics.BATCH_SIZE.labels(self._model_name).observe(sum(q.request.num_images for q in batch))
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._threads, self.engine.step, [queued.request for queued in batch]
            )
        except Exception as error:  # noqa: BLE001 - every request of the step gets the error
            if isinstance(error, RequestTimeoutError):
                metrics.REQUESTS_TIMED_OUT.labels(self._model_name).inc(len(batch))
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(error)
        else:
            elapsed = time.monotonic() - started
            for queued, output in zip(batch, outputs, strict=True):
                if output.failure is not None:  # its rank group failed; the rest of the step was served
                    if isinstance(output.failure, RequestTimeoutError):
                        metrics.REQUESTS_TIMED_OUT.labels(self._model_name).inc()
                    if not queued.future.done():
                        queued.future.set_exception(output.failure)
                    continue
                output.queue_time_s = started - queued.enqueued_at
                output.inference_time_s = elapsed
                metrics.INFERENCE_TIME.labels(self._model_name).observe(elapsed)
                metrics.IMAGES_GENERATED.labels(self._model_name).inc(len(output.images))
                for lora in queued.request.loras:
                    metrics.LORA_REQUESTS.labels(self._model_name, lora.name).inc()
                if not queued.future.done():
                    queued.future.set_result(output)
        finally:
            self._running.dec(len(batch))
            self._free_slots.release()
            self._steps.discard(asyncio.current_task())
            self._changed.set()
