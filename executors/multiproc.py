"""MultiProcDiffusionExecutor ("mp"): one spawned worker process per rank, talking over a pipe."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, wait as wait_futures
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait as wait_ready
from multiprocessing.process import BaseProcess
from typing import Any

from executors.base import DiffusionExecutor, RpcTimeoutError, WorkerDiedError, WorkerRpcError, WorkerStartupError
from workers.process import RpcCall, RpcProgress, RpcReply, run_worker_process

logger = logging.getLogger(__name__)

# How long a worker gets to leave by itself before it is terminated, then killed.
_GRACEFUL_EXIT_S = 5.0


def describe_exit(exitcode: int | None) -> str:
    """multiprocessing's exitcode in words: 'exit code 1', 'killed by SIGKILL'."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


@dataclass(eq=False)
class _WorkerProcess:
    rank: int
    process: BaseProcess
    conn: Connection
    cancellations: Connection  # one way, to the worker's cancellation thread
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    # Two threads reaping one process race in waitpid, and the loser never learns the exit code.
    reap_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, Future] = field(default_factory=dict)
    death: str | None = None  # set once the worker is gone, with the reason
    retired: bool = False  # stopped on purpose (shutdown or replacement): its death is no news

    def wait_exit(self) -> str:
        with self.reap_lock:
            self.process.join(_GRACEFUL_EXIT_S)
            return describe_exit(self.process.exitcode)

    def stop(self, graceful: bool = True) -> None:
        """Give it time to leave (it was asked to), terminate, then kill; or kill at once."""
        with self.reap_lock:
            if graceful:
                self.process.join(_GRACEFUL_EXIT_S)
                if self.process.is_alive():
                    self.process.terminate()
                    self.process.join(_GRACEFUL_EXIT_S)
            if self.process.is_alive():
                self.process.kill()  # SIGKILL also ends a stopped or hung process
                self.process.join()
        self.conn.close()
        self.cancellations.close()


class MultiProcDiffusionExecutor(DiffusionExecutor):
    """Spawns ``num_gpus`` worker processes (rank r uses ``cuda:r``, or its share of the CPU cores).

    Several threads may call ``collective_rpc`` at once: each reply carries its call id and a
    reader thread per worker hands it to the matching caller, after reporting the progress
    (partial images, steps) the call sent before it. A worker that dies fails the calls it held
    at once and is reported to ``death_listeners``; ``restart_worker`` replaces it.
    """

    def _init_executor(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._num_threads = max(1, (os.cpu_count() or 1) // self.od_config.num_gpus)
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # guards every worker's pending map, death, and the list itself
        self._restarting: set[int] = set()
        self._workers: list[_WorkerProcess] = []
        try:
            for rank in range(self.od_config.num_gpus):
                self._workers.append(self._spawn(rank))
            deadline = time.monotonic() + self.od_config.worker_start_timeout_s
            for worker in self._workers:
                self._wait_ready(worker, deadline)
        except BaseException:
            self._shutdown_workers()
            raise
        for worker in self._workers:
            self._start_reader(worker)

    def _spawn(self, rank: int) -> _WorkerProcess:
        parent_conn, child_conn = self._context.Pipe()
        cancellations_reader, cancellations = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_worker_process,
            args=(rank, self.od_config, child_conn, cancellations_reader, self._num_threads),
            name=f"imagegen-worker-{rank}",
            daemon=True,
        )
        process.start()
        # Drop our copies of the child's ends, so that EOF on ours means the worker is gone.
        child_conn.close()
        cancellations_reader.close()
        return _WorkerProcess(rank, process, parent_conn, cancellations)

    def _wait_ready(self, worker: _WorkerProcess, deadline: float) -> None:
        ready = wait_ready([worker.conn, worker.process.sentinel], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise WorkerStartupError(
                f"worker rank {worker.rank} did not load its model within {self.od_config.worker_start_timeout_s:g}s"
            )
        status = None
        if worker.conn in ready:
            try:
                status = worker.conn.recv()
            except (EOFError, OSError):
                pass
        if status is not None and status["status"] == "ready":
            return
        if status is not None:
            raise WorkerStartupError(f"worker rank {worker.rank} failed to start: {status['error']}")
        raise WorkerStartupError(f"worker rank {worker.rank} exited while starting ({worker.wait_exit()})")

    def _start_reader(self, worker: _WorkerProcess) -> None:
        threading.Thread(
            target=self._read_replies, args=(worker,), name=f"imagegen-rpc-reader-{worker.rank}", daemon=True
        ).start()

    def _read_replies(self, worker: _WorkerProcess) -> None:
        while True:
            try:
                reply: RpcReply | RpcProgress = worker.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(reply, RpcProgress):
                with self._lock:
                    awaited = reply.call_id in worker.pending
                if awaited:  # else its caller gave up waiting
                    self._report_progress(reply.progress)
                continue
            with self._lock:
                future = worker.pending.pop(reply.call_id, None)
            if future is None:
                continue  # its caller gave up waiting
            if reply.ok:
                future.set_result(reply.value)
            else:
                future.set_exception(WorkerRpcError(f"worker rank {worker.rank}: {reply.value}"))
        # The pipe closed: the worker died, or we stopped it.
        death = f"worker rank {worker.rank} died ({worker.wait_exit()})"
        if not (self.is_closed or worker.retired):
            logger.error(death)
            # Before the death is visible: listeners mark the rank as restarting, so nobody
            # mistakes the engine for dead in between.
            self._report_worker_death(worker.rank, death)
        with self._lock:
            worker.death = death
            orphaned, worker.pending = worker.pending, {}
        for future in orphaned.values():
            future.set_exception(WorkerDiedError(death))

    def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
        unique_reply_rank: int | None = None,
    ) -> Any:
        timeout = self._timeout(timeout)
        call = RpcCall(next(self._call_ids), method, tuple(args), dict(kwargs or {}))
        with self._lock:
            workers = list(self._workers)
        futures: list[Future] = []
        for worker in workers:
            future: Future = Future()
            with self._lock:
                if worker.death is not None:
                    raise WorkerDiedError(worker.death)
                worker.pending[call.call_id] = future
            try:
                with worker.send_lock:
                    worker.conn.send(call)
            except OSError:
                pass  # the worker is gone; its reader fails the future
            futures.append(future)
        _, late = wait_futures(futures, timeout=timeout)
        if late:
            with self._lock:
                for worker in workers:
                    worker.pending.pop(call.call_id, None)
            ranks = tuple(worker.rank for worker, future in zip(workers, futures) if future in late)
            raise RpcTimeoutError(
                f"RPC '{method}' timed out after {timeout:g}s waiting for rank {', '.join(map(str, ranks))}", ranks
            )
        replies = [future.result() for future in futures]
        return replies if unique_reply_rank is None else replies[unique_reply_rank]

    def cancel_requests(self, request_ids: list[str]) -> None:
        with self._lock:
            workers = [worker for worker in self._workers if worker.death is None]
        for worker in workers:
            try:
                # No lock: a short list of ids goes out in one atomic write, and the main pipe's
                # lock may be held for a long send of a step's requests.
                worker.cancellations.send(list(request_ids))
            except OSError:
                pass  # gone: nothing left to cancel there

    def check_health(self) -> None:
        # Liveness only: an RPC would queue behind a long generation on the single-threaded worker.
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            if worker.death is not None:
                raise WorkerDiedError(worker.death)
            if not worker.process.is_alive():
                raise WorkerDiedError(f"worker rank {worker.rank} is not running ({describe_exit(worker.process.exitcode)})")

    def is_ready(self) -> bool:
        with self._lock:
            return not self.is_closed and not self._restarting and all(w.death is None for w in self._workers)

    def restart_worker(self, rank: int) -> None:
        with self._lock:
            if self.is_closed or rank in self._restarting:
                return
            self._restarting.add(rank)
            old = self._workers[rank]
            old.retired = True
        try:
            # Dead or hung, it has nothing left to finish; a hung one must free the device first.
            old.stop(graceful=False)
            new = self._spawn(rank)
            try:
                self._wait_ready(new, time.monotonic() + self.od_config.worker_start_timeout_s)
            except BaseException:
                new.retired = True
                new.stop(graceful=False)
                raise
            with self._lock:
                if self.is_closed:
                    new.retired = True
                else:
                    self._workers[rank] = new
            if new.retired:
                new.stop()
            else:
                self._start_reader(new)
                logger.info("worker rank %d restarted", rank)
        finally:
            with self._lock:
                self._restarting.discard(rank)

    def _shutdown_workers(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.retired = True
            try:
                with worker.send_lock:
                    worker.conn.send(None)
            except OSError:
                pass
        for worker in workers:
            worker.stop()
