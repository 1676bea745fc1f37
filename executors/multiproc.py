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
from workers.process import RpcCall, RpcReply, run_worker_process

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
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    # Two threads reaping one process race in waitpid, and the loser never learns the exit code.
    reap_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, Future] = field(default_factory=dict)
    death: str | None = None  # set once the worker is gone, with the reason


def _wait_exit(worker: _WorkerProcess) -> str:
    with worker.reap_lock:
        worker.process.join(_GRACEFUL_EXIT_S)
        return describe_exit(worker.process.exitcode)


class MultiProcDiffusionExecutor(DiffusionExecutor):
    """Spawns ``num_gpus`` worker processes (rank r uses ``cuda:r``, or its share of the CPU cores).

    Several threads may call ``collective_rpc`` at once: each reply carries its call id and a
    reader thread per worker hands it to the matching caller.
    """

    def _init_executor(self) -> None:
        context = multiprocessing.get_context("spawn")
        num_ranks = self.od_config.num_gpus
        num_threads = max(1, (os.cpu_count() or 1) // num_ranks)
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # guards every worker's pending map and death
        self._workers: list[_WorkerProcess] = []
        try:
            for rank in range(num_ranks):
                parent_conn, child_conn = context.Pipe()
                process = context.Process(
                    target=run_worker_process,
                    args=(rank, self.od_config, child_conn, num_threads),
                    name=f"imagegen-worker-{rank}",
                    daemon=True,
                )
                process.start()
                # Drop our copy of the child's end, so that EOF on ours means the worker is gone.
                child_conn.close()
                self._workers.append(_WorkerProcess(rank, process, parent_conn))
            deadline = time.monotonic() + self.od_config.worker_start_timeout_s
            for worker in self._workers:
                self._wait_ready(worker, deadline)
        except BaseException:
            self._shutdown_workers()
            raise
        for worker in self._workers:
            threading.Thread(
                target=self._read_replies, args=(worker,), name=f"imagegen-rpc-reader-{worker.rank}", daemon=True
            ).start()

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
        raise WorkerStartupError(f"worker rank {worker.rank} exited while starting ({_wait_exit(worker)})")

    def _read_replies(self, worker: _WorkerProcess) -> None:
        while True:
            try:
                reply: RpcReply = worker.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = worker.pending.pop(reply.call_id, None)
            if future is None:
                continue  # its caller gave up waiting
            if reply.ok:
                future.set_result(reply.value)
            else:
                future.set_exception(WorkerRpcError(f"worker rank {worker.rank}: {reply.value}"))
        # The pipe closed: the worker died, or shutdown() stopped it.
        death = f"worker rank {worker.rank} died ({_wait_exit(worker)})"
        with self._lock:
            worker.death = death
            orphaned, worker.pending = worker.pending, {}
        if not self.is_closed:
            logger.error(death)
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
        futures: list[Future] = []
        for worker in self._workers:
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
                for worker in self._workers:
                    worker.pending.pop(call.call_id, None)
            ranks = ", ".join(str(rank) for rank, f in enumerate(futures) if f in late)
            raise RpcTimeoutError(f"RPC '{method}' timed out after {timeout:g}s waiting for rank {ranks}")
        replies = [future.result() for future in futures]
        return replies if unique_reply_rank is None else replies[unique_reply_rank]

    def check_health(self) -> None:
        # Liveness only: an RPC would queue behind a long generation on the single-threaded worker.
        for worker in self._workers:
            if worker.death is not None:
                raise WorkerDiedError(worker.death)
            if not worker.process.is_alive():
                raise WorkerDiedError(
                    f"worker rank {worker.rank} is not running ({describe_exit(worker.process.exitcode)})"
                )

    def _shutdown_workers(self) -> None:
        for worker in self._workers:
            try:
                with worker.send_lock:
                    worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            with worker.reap_lock:
                process = worker.process
                process.join(_GRACEFUL_EXIT_S)
                if process.is_alive():
                    process.terminate()
                    process.join(_GRACEFUL_EXIT_S)
                if process.is_alive():
                    process.kill()
                    process.join()
            worker.conn.close()
