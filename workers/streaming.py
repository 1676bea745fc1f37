"""Calls whose progress (partial images, steps) a host streams while they run: shared by the Ray actor and the gRPC worker."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from workers.data import WorkerProgress

T = TypeVar("T")


def stream_call(
    pipeline_thread: ThreadPoolExecutor, worker: Any, call: Callable[[], T]
) -> Iterator[WorkerProgress | T]:
    """Run ``call()`` on ``pipeline_thread`` with the worker's ``progress_sink`` set: yield each
    partial image and StepProgress it makes as soon as it is made, then its result (or raise its error).

    The call runs in a thread of its own because the caller's thread must be free to yield
    meanwhile; a single-thread pool also runs the calls one at a time, in arrival order.
    """
    progress: queue.SimpleQueue[WorkerProgress | None] = queue.SimpleQueue()

    def run() -> T:
        worker.progress_sink = progress.put
        try:
            return call()
        finally:
            worker.progress_sink = None

    reply = pipeline_thread.submit(run)
    reply.add_done_callback(lambda _: progress.put(None))
    while (item := progress.get()) is not None:
        yield item
    yield reply.result()
