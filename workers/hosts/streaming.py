"""PipelineThread: the one thread of a worker process that runs torch, and the calls it runs, with their
progress (partial images, steps) streamed while they run. Every worker host uses it: the mp worker
program, the Ray actor and the gRPC worker.

In step mode (``--scheduling step``, workers.runtime.step_batching) the thread also runs the worker's running
set: a generate call's requests join it between two denoising iterations, and the call is answered
when they have all left it, while other calls go on being answered in between.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from workers.data import WorkerProgress
from workers.runtime.encoding import when_encoded

logger = logging.getLogger(__name__)

# The worker methods whose requests join the running set in step mode; every other method is a call.
STEP_METHODS = frozenset({"generate", "generate_shard"})


@dataclass(eq=False)
class _Work:
    """A call waiting for the pipeline thread: ``run()``, or (step mode) a generate call to join."""

    run: Callable[[], Any]
    future: Future = field(default_factory=Future)
    sink: Callable[[WorkerProgress], None] | None = None  # the call's progress, as it comes
    joins: tuple[str, tuple, dict] | None = None  # (method, args, kwargs) of a call that can join
    on_done: Callable[[Future], None] | None = None  # run once answered (see PipelineThread.call)


_STOP = object()


class PipelineThread:
    """Runs a worker's pipeline work on one thread, one call at a time in arrival order.

    One thread, not "whichever thread the call came in on": each thread that runs torch ops gets an
    OpenMP team of its own, and on CPU two teams fight over the same cores. Measured on the tiny
    model (2 cores): a 4-step call took 141 ms with everything on one thread, 250 ms once loading
    and generation had run on two. So loading runs here too (``submit(worker.initialize)``), or the
    host calls ``run()`` on the thread that loaded the model (the mp worker's main thread).

    ``call`` takes any thread's calls; ``use_step_loop()`` (once the model is loaded) turns on step
    mode where the settings ask for it and the pipeline has a step loop.

    A call that encodes its images (generate_shard(encode=True)) is answered once its encodes are done, from
    the encode pool's thread, while this thread goes on with the next call or iteration: ``on_done`` and the
    calls' sinks may run on those threads too.
    """

    def __init__(self, worker: Any, num_threads: int | None = None):
        self._worker = worker
        worker.encodes_deferred = True  # _answer waits for them
        self._num_threads = num_threads
        self._inbox: queue.SimpleQueue[_Work | object] = queue.SimpleQueue()
        self._steps = None  # the StepLoop, in step mode
        self._thread: threading.Thread | None = None
        # When the work now running (a call, or a running-set iteration) started; None while idle.
        self.busy_since: float | None = None

    # -- the thread --------------------------------------------------------------------------------
    def start(self) -> PipelineThread:
        """Run on a thread of its own (torch set to ``num_threads`` there)."""
        self._thread = threading.Thread(target=self.run, name="imagegen-pipeline", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Serve calls on this thread until ``shutdown()``."""
        if self._num_threads is not None:
            import torch

            torch.set_num_threads(self._num_threads)
        while True:
            # Block for the next call when nothing runs; else take only the calls already there.
            block = self._steps is None or self._steps.idle
            while True:
                try:
                    work = self._inbox.get(block=block)
                except queue.Empty:
                    break
                if work is _STOP:
                    return
                self._take(work)
                block = False
            if self._steps is not None:
                self._iterate()

    def shutdown(self, wait: bool = True) -> None:
        """Stop after the calls already queued (a running set's requests are abandoned)."""
        self._inbox.put(_STOP)
        if wait and self._thread is not None:
            self._thread.join()

    # -- calls -------------------------------------------------------------------------------------
    def submit(self, run: Callable[[], Any]) -> Future:
        """Run ``run()`` on the pipeline thread, after the calls before it; its Future."""
        work = _Work(run)
        self._inbox.put(work)
        return work.future

    def call(
        self,
        method: str,
        args: tuple = (),
        kwargs: dict | None = None,
        sink: Callable[[WorkerProgress], None] | None = None,
        on_done: Callable[[Future], None] | None = None,
    ) -> Future:
        """The worker's public ``method(*args, **kwargs)``: its Future, with its progress to ``sink``.

        ``on_done(future)`` runs once the call is answered, after its progress: on the pipeline thread, or on an
        encode pool thread when the call encodes images (a host whose connection only one thread may write on
        at a time locks around its sends)."""
        kwargs = kwargs or {}

        def run() -> Any:
            if method.startswith("_"):
                raise AttributeError(f"'{method}' is not a public worker method")
            return getattr(self._worker, method)(*args, **kwargs)

        work = _Work(run, sink=sink, on_done=on_done, joins=(method, args, kwargs) if method in STEP_METHODS else None)
        self._inbox.put(work)
        return work.future

    def stream(self, method: str, args: tuple = (), kwargs: dict | None = None) -> Iterator[Any]:
        """``call`` that yields each partial image and StepProgress as soon as it is made, then the
        call's result (or raises its error). For hosts that answer a call with a stream (Ray, gRPC)."""
        progress: queue.SimpleQueue[Any] = queue.SimpleQueue()
        done = object()
        future = self.call(method, args, kwargs, sink=progress.put, on_done=lambda _: progress.put(done))
        while (item := progress.get()) is not done:
            yield item
        yield future.result()

    def use_step_loop(self) -> None:
        """Once the model is loaded: step mode for the calls after this one if ``--scheduling step``
        and the pipeline can (else one line why, and request mode)."""
        self.submit(self._make_step_loop)

    def _make_step_loop(self) -> None:
        worker = self._worker
        if worker.od_config.scheduling != "step":
            return
        from workers.runtime.step_batching import StepLoop, step_mode_refusal  # torch: only in worker processes

        refusal = step_mode_refusal(worker)
        if refusal is not None:
            # The engine says it once at start-up, with the reason from describe().
            logger.debug("rank %d: --scheduling step runs as request: %s", worker.rank, refusal)
            return
        self._steps = StepLoop(worker)

    # -- on the pipeline thread --------------------------------------------------------------------
    def _take(self, work: _Work) -> None:
        if not work.future.set_running_or_notify_cancel():
            return
        self.busy_since = time.monotonic()
        try:
            if work.joins is not None and self._steps is not None:
                method, args, kwargs = work.joins
                # Answered in _iterate, once its requests have left the running set.
                self._steps.submit(work, method, *args, send=_send, **kwargs)
                return
            self._worker.progress_sink = work.sink
            try:
                result = work.run()
            finally:
                self._worker.progress_sink = None
        except Exception as error:  # noqa: BLE001 - the caller gets it, the thread lives on
            _answer(work, error=error)
        else:
            _answer(work, result)
        finally:
            self.busy_since = None

    def _iterate(self) -> None:
        self.busy_since = time.monotonic()
        try:
            answered = self._steps.iterate(_send)
        except Exception as error:  # noqa: BLE001 - the running set is lost, the worker lives on
            logger.exception("rank %d: the running set failed", self._worker.rank)
            answered = []
            for work in self._steps.abandon():
                _answer(work, error=error)
        finally:
            self.busy_since = None
        for work, outputs in answered:
            _answer(work, outputs)


def _send(work: _Work, progress: Any) -> None:
    if work.sink is not None:
        work.sink(progress)


def _answer(work: _Work, result: Any = None, error: BaseException | None = None) -> None:
    if error is None:
        when_encoded(result, lambda done: _settle(work, done))
    else:
        _settle(work, error=error)


def _settle(work: _Work, result: Any = None, error: BaseException | None = None) -> None:
    if error is None:
        work.future.set_result(result)
    else:
        work.future.set_exception(error)
    if work.on_done is not None:
        work.on_done(work.future)
