"""The thread a worker host runs torch on, and calls whose progress (partial images, steps) it streams
while they run: shared by the Ray actor and the gRPC worker."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from workers.data import WorkerProgress

T = TypeVar("T")


def pipeline_thread(num_threads: int) -> ThreadPoolExecutor:
    """The one thread of a worker process that runs torch: loading, warm-up and every pipeline call,
    one at a time in arrival order (the pipeline is not thread-safe).

    One thread, not "whichever thread the call came in on": each thread that runs torch ops gets an
    OpenMP team of its own, and on CPU two teams fight over the same cores. Measured on the tiny
    model (2 cores): a 4-step call took 141 ms with everything on one thread, 250 ms once loading
    and generation had run on two.
    """

    def start() -> None:
        import torch

        torch.set_num_threads(num_threads)

    return ThreadPoolExecutor(1, thread_name_prefix="imagegen-pipeline", initializer=start)


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
