"""AsyncDiffusionEngine: the asyncio front of DiffusionEngine that forms batches from concurrent requests."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from engine import metrics
from engine.engine import DiffusionEngine, DiffusionOutput
from engine.errors import EngineDeadError
from workers.data import OmniDiffusionRequest

logger = logging.getLogger(__name__)

# Steps in flight at once: while the workers run one, the next is already queued at them, so they
# never idle while the last step's images travel back and get encoded.
PIPELINE_DEPTH = 2


@dataclass(eq=False)
class _Queued:
    request: OmniDiffusionRequest
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)


class AsyncDiffusionEngine:
    """Queues requests and runs them in batches of up to ``max_batch_size`` images.

    A batch leaves when it is full or when its oldest request has waited ``batch_timeout_ms``;
    it holds only requests that one pipeline call can serve together (same size, steps, ...).
    ``step()`` runs in a thread, so the event loop never blocks on generation.
    """

    def __init__(self, engine: DiffusionEngine):
        self.engine = engine
        self._model_name = engine.od_config.model_name
        self._max_batch_size = engine.od_config.max_batch_size
        self._batch_timeout_s = engine.od_config.batch_timeout_ms / 1000
        self._queue: deque[_Queued] = deque()
        self._arrived = asyncio.Event()
        self._free_slots = asyncio.Semaphore(PIPELINE_DEPTH)
        self._threads = ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="imagegen-step")
        self._steps: set[asyncio.Task] = set()
        self._scheduler: asyncio.Task | None = None
        self._waiting = metrics.REQUESTS_WAITING.labels(self._model_name)
        self._running = metrics.REQUESTS_RUNNING.labels(self._model_name)

    def start(self) -> None:
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="imagegen-scheduler")

    async def close(self) -> None:
        """Stop scheduling, let running steps finish, fail what is still queued."""
        if self._scheduler is not None:
            self._scheduler.cancel()
        if self._steps:
            await asyncio.wait(self._steps)
        while self._queue:
            queued = self._queue.popleft()
            if not queued.future.done():
                queued.future.set_exception(EngineDeadError("the server is shutting down"))
        self._waiting.set(0)
        self._threads.shutdown(wait=False)

    async def generate(self, request: OmniDiffusionRequest) -> DiffusionOutput:
        """Validate, queue and wait for ``request``. Raises the engine's errors."""
        queued = _Queued(self.engine.prepare(request), asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        self._waiting.inc()
        self._arrived.set()
        try:
            return await queued.future
        finally:
            if queued in self._queue:  # cancelled while still queued: it must not run
                self._queue.remove(queued)
                self._waiting.dec()

    # -- scheduling ------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            await self._free_slots.acquire()
            await self._wait_for_batch()
            batch = self._take_batch()
            task = asyncio.get_running_loop().create_task(self._run_step(batch))
            self._steps.add(task)
            task.add_done_callback(self._steps.discard)

    def _queued_images(self) -> int:
        return sum(queued.request.num_images for queued in self._queue)

    async def _wait_for_batch(self) -> None:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0].enqueued_at + self._batch_timeout_s
        while self._queue and self._queued_images() < self._max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        while not self._queue:  # everything that was queued got cancelled meanwhile
            self._arrived.clear()
            await self._arrived.wait()

    def _take_batch(self) -> list[_Queued]:
        """The oldest request, then the next compatible ones in arrival order, up to max_batch_size images."""
        oldest = self._queue.popleft()
        batch, images = [oldest], oldest.request.num_images
        key = oldest.request.batch_key()
        for queued in list(self._queue):
            if images >= self._max_batch_size:
                break
            if queued.request.batch_key() == key and images + queued.request.num_images <= self._max_batch_size:
                self._queue.remove(queued)
                batch.append(queued)
                images += queued.request.num_images
        return batch

    async def _run_step(self, batch: list[_Queued]) -> None:
        started = time.monotonic()
        self._waiting.dec(len(batch))
        self._running.inc(len(batch))
        for queued in batch:
            metrics.QUEUE_TIME.labels(self._model_name).observe(started - queued.enqueued_at)
        metrics.BATCH_SIZE.labels(self._model_name).observe(sum(q.request.num_images for q in batch))
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._threads, self.engine.step, [queued.request for queued in batch]
            )
        except Exception as error:  # noqa: BLE001 - every request of the step gets the error
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(error)
        else:
            elapsed = time.monotonic() - started
            for queued, output in zip(batch, outputs, strict=True):
                metrics.INFERENCE_TIME.labels(self._model_name).observe(elapsed)
                metrics.IMAGES_GENERATED.labels(self._model_name).inc(len(output.images))
                if not queued.future.done():
                    queued.future.set_result(output)
        finally:
            self._running.dec(len(batch))
            self._free_slots.release()
