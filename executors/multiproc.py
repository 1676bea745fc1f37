"""MultiProcDiffusionExecutor ("mp"): one worker program per rank on this machine, talking over a pipe.

Each worker is ``python -m workers.hosts.process`` (see that module for the protocol), started with
subprocess rather than multiprocessing: it never re-imports the caller's main module, so engines
start from plain scripts, notebooks and ``python -c`` alike.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any

import workers
from executors.base import DiffusionExecutor, RpcTimeoutError, WorkerDiedError, WorkerRpcError, WorkerStartupError
from workers.hosts.process import RpcCall, RpcProgress, RpcReply, worker_settings

logger = logging.getLogger(__name__)

# How long a worker gets to leave by itself before it is terminated, then killed.
_GRACEFUL_EXIT_S = 5.0
# The folder that holds the workers package: the worker programs import the very code the engine runs.
_CODE_ROOT = str(Path(workers.__file__).resolve().parent.parent)


def free_local_address() -> str:
    """127.0.0.1:<a port free now>, where a rank group's leader can meet its peers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def describe_exit(returncode: int | None) -> str:
    """A process's return code in words: 'exit code 1', 'killed by SIGKILL'."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass(eq=False)
class _WorkerProcess:
    rank: int
    process: subprocess.Popen
    conn: Connection
    cancellations: Connection  # one way, to the worker's cancellation thread; closing it ends the worker
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, Future] = field(default_factory=dict)
    death: str | None = None  # set once the worker is gone, with the reason
    retired: bool = False  # stopped on purpose (shutdown or replacement): its death is no news
    stop_reason: str | None = None  # why it was stopped, when that is not its own death (its group's restart)

    def wait_exit(self) -> str:
        try:
            self.process.wait(_GRACEFUL_EXIT_S)
        except subprocess.TimeoutExpired:
            pass
        return describe_exit(self.process.returncode)

    def stop(self, graceful: bool = True) -> None:
        """Give it time to leave (it was asked to), terminate, then kill; or kill at once."""
        if graceful:
            try:
                self.process.wait(_GRACEFUL_EXIT_S)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(_GRACEFUL_EXIT_S)
                except subprocess.TimeoutExpired:
                    pass
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL also ends a stopped or hung process
            self.process.wait()
        self.conn.close()
        self.cancellations.close()


class MultiProcDiffusionExecutor(DiffusionExecutor):
    """Starts ``num_gpus`` worker programs (rank r uses ``cuda:r``, or its share of the CPU cores).

    The ranks of each rank group meet at an address of their own (a free port on this host),
    chosen anew whenever the group is started.

    Several threads may call ``collective_rpc`` at once: each reply carries its call id and a
    reader thread per worker hands it to the matching caller, after reporting the progress
    (partial images, steps) the call sent before it. A worker that dies fails the calls it held
    at once and is reported to ``death_listeners``; ``restart_worker`` replaces it.
    """

    def _init_executor(self) -> None:
        self._num_threads = self.od_config.cpu_threads_per_rank
        self._settings = worker_settings(self.od_config)
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # guards every worker's pending map, death, and the list itself
        self._restarting: set[int] = set()
        self._workers: list[_WorkerProcess] = []
        try:
            for leader in range(0, self.od_config.num_gpus, self.od_config.rank_group_size):
                self._workers += self._spawn_group(leader)
            deadline = time.monotonic() + self.od_config.worker_start_timeout_s
            for worker in self._workers:
                self._wait_ready(worker, deadline)
        except BaseException:
            self._shutdown_workers()
            raise
        for worker in self._workers:
            self._start_reader(worker)

    def _spawn_group(self, rank: int) -> list[_WorkerProcess]:
        """Start every rank of ``rank``'s group, with a fresh meeting address when the group has several."""
        ranks = self.od_config.rank_group_of(rank)
        settings = self._settings
        if len(ranks) > 1:
            settings = {**settings, "rank_group_address": free_local_address()}
        return [self._spawn(member, settings) for member in ranks]

    def _spawn(self, rank: int, settings: dict) -> _WorkerProcess:
        if not sys.executable:
            raise WorkerStartupError(
                "the mp backend starts workers with this Python interpreter, but sys.executable is empty "
                "(an embedded interpreter?): use --backend ray, or run the engine from a normal python"
            )
        parent_conn, child_conn = Pipe()
        cancellations_reader, cancellations = Pipe(duplex=False)
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [_CODE_ROOT, environment.get("PYTHONPATH")]))
        command = [
            sys.executable, "-m", "workers.hosts.process", "--rank", str(rank), "--num-threads", str(self._num_threads),
            "--call-fd", str(child_conn.fileno()), "--cancel-fd", str(cancellations_reader.fileno()),
        ]
        try:
            process = subprocess.Popen(
                command, pass_fds=(child_conn.fileno(), cancellations_reader.fileno()), env=environment
            )
        finally:
            # Drop our copies of the child's ends, so that EOF on ours means the worker is gone.
            child_conn.close()
            cancellations_reader.close()
        worker = _WorkerProcess(rank, process, parent_conn, cancellations)
        try:
            parent_conn.send(settings)
        except OSError:
            pass  # it died at once; _wait_ready says how
        return worker

    def _wait_ready(self, worker: _WorkerProcess, deadline: float) -> None:
        # A worker that exits closes its end of the pipe, which wakes this wait too.
        if not wait_ready([worker.conn], timeout=max(0.0, deadline - time.monotonic())):
            raise WorkerStartupError(
                f"worker rank {worker.rank} did not load its model within {self.od_config.worker_start_timeout_s:g}s"
            )
        try:
            status = worker.conn.recv()
        except (EOFError, OSError):
            status = None
        if status is not None and status["status"] == "ready":
            self._set_up_rank(worker.rank, lambda method, args: self._call_before_serving(worker, method, args, deadline))
            return
        if status is not None:
            raise WorkerStartupError(f"worker rank {worker.rank} failed to start: {status['error']}")
        raise WorkerStartupError(f"worker rank {worker.rank} exited while starting ({worker.wait_exit()})")

    def _call_before_serving(self, worker: _WorkerProcess, method: str, args: tuple, deadline: float) -> Any:
        """One call to a worker whose reader thread has not started yet: the reply is read here."""
        worker.conn.send(RpcCall(next(self._call_ids), method, args, {}))
        try:
            while worker.conn.poll(max(0.0, deadline - time.monotonic())):
                reply = worker.conn.recv()
                if isinstance(reply, RpcReply):
                    if not reply.ok:
                        raise WorkerStartupError(f"worker rank {worker.rank}: {method} failed: {reply.value}")
                    return reply.value
        except (EOFError, OSError):
            raise WorkerStartupError(f"worker rank {worker.rank} exited during {method} ({worker.wait_exit()})") from None
        raise WorkerStartupError(f"worker rank {worker.rank} did not answer {method} in time")

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
        death = worker.stop_reason or f"worker rank {worker.rank} died ({worker.wait_exit()})"
        if not (self.is_closed or worker.retired):
            logger.error(death)
            # Before the death is visible: listeners mark the rank as restarting, so nobody
            # mistakes the engine for dead in between.
            self._report_worker_death(worker.rank, death)
        with self._lock:
            worker.death = death
            orphaned, worker.pending = worker.pending, {}
        for future in orphaned.values():
            future.set_exception(WorkerDiedError(death, (worker.rank,)))

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
        serving = self.serving_ranks()
        with self._lock:
            workers = [self._workers[rank] for rank in serving]
        futures: list[Future] = []
        for worker in workers:
            future: Future = Future()
            with self._lock:
                if worker.death is not None:
                    raise WorkerDiedError(worker.death, (worker.rank,))
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
        errors = [future.exception() for future in futures if future.exception() is not None]
        if errors:
            # A dead rank's error first: in a rank group, its peers' errors only say that it went missing.
            raise next((error for error in errors if isinstance(error, WorkerDiedError)), errors[0])
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
        failed = self.probe_ranks(self.serving_ranks(), 0)
        if failed:
            rank, reason = next(iter(failed.items()))
            raise WorkerDiedError(reason, (rank,))

    def probe_ranks(self, ranks: range | list[int], timeout: float) -> dict[int, str]:
        # Liveness only: an RPC would queue behind a long generation on the single-threaded worker.
        with self._lock:
            workers = [self._workers[rank] for rank in ranks]
        failed = {}
        for worker in workers:
            if worker.death is not None:
                failed[worker.rank] = worker.death
            elif worker.process.poll() is not None:
                failed[worker.rank] = f"worker rank {worker.rank} is not running ({describe_exit(worker.process.returncode)})"
        return failed

    def restart_worker(self, rank: int) -> None:
        """Replace rank's worker; in a rank group, the whole group, which meets anew."""
        ranks = self.od_config.rank_group_of(rank)
        with self._lock:
            if self.is_closed or self._restarting.intersection(ranks):
                return
            self._restarting.update(ranks)
            olds = [self._workers[member] for member in ranks]
            for old in olds:
                old.retired = True
                if old.rank != rank:
                    old.stop_reason = f"worker rank {old.rank} stopped: rank {rank} of its rank group is gone"
        try:
            # Dead or hung, they have nothing left to finish; a hung one must free the device first.
            # The group's survivors go too: their process group waits for a peer that is gone.
            for old in olds:
                old.stop(graceful=False)
            news = self._spawn_group(rank)
            try:
                deadline = time.monotonic() + self.od_config.worker_start_timeout_s
                for new in news:
                    self._wait_ready(new, deadline)
            except BaseException:
                for new in news:
                    new.retired = True
                    new.stop(graceful=False)
                raise
            with self._lock:
                closed = self.is_closed
                if not closed:
                    for member, new in zip(ranks, news):
                        self._workers[member] = new
            for new in news:
                if closed:
                    new.retired = True
                    new.stop()
                else:
                    self._start_reader(new)
            if not closed:
                logger.info("worker rank %s restarted", ", ".join(map(str, ranks)))
        finally:
            with self._lock:
                self._restarting.difference_update(ranks)

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
