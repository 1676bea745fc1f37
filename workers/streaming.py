"""Calls whose partial images a host streams while they run: shared by the Ray actor and the gRPC worker."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from workers.data import PartialImageOutput

T = TypeVar("T")


def stream_call(
    pipeline_thread: ThreadPoolExecutor, worker: Any, call: Callable[[], T]
) -> Iterator[PartialImageOutput | T]:
    """Run ``call()`` on ``pipeline_thread`` with the worker's ``progress_sink`` set: yield each
    PartialImageOutput it decodes as soon as it is decoded, then its result (or raise its error).

    The call runs in a thread of its own because the caller's thread must be free to yield
    meanwhile; a single-thread pool also runs the calls one at a time, in arrival order.
    """
    partials: queue.SimpleQueue[PartialImageOutput | None] = queue.SimpleQueue()

    def run() -> T:
        worker.progress_sink = partials.put
        try:
            return call()
        finally:
            worker.progress_sink = None

    reply = pipeline_thread.submit(run)
    reply.add_done_callback(lambda _: partials.put(None))
    while (partial := partials.get()) is not None:
        yield partial
    yield reply.result()
