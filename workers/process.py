"""The worker process loop that MultiProcDiffusionExecutor spawns, and its wire protocol.

Messages on the pipe, parent -> worker: ``RpcCall`` or ``None`` (shut down).
Worker -> parent: first the handshake ``{"status": "ready", ...}`` or ``{"status": "error", "error": ...}``,
then one ``RpcReply`` per call, in any order the parent matches by ``call_id``, each after the
``RpcProgress`` messages (partial images, step progress) that its call sent while it ran.
A second, one-way pipe carries lists of request ids to cancel; a thread of the worker reads it,
because the main thread is busy in the pipeline exactly when a cancel matters.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from workers.config import OmniDiffusionConfig
from workers.data import WorkerProgress
from workers.logs import configure_logging


@dataclass(frozen=True)
class RpcCall:
    call_id: int
    method: str
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class RpcReply:
    call_id: int
    ok: bool
    value: Any  # the method's result, or the error message when not ok


@dataclass(frozen=True)
class RpcProgress:
    """A partial image or a StepProgress that a call sends on before its reply."""

    call_id: int
    progress: WorkerProgress


def _exit_when_parent_dies() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        # The parent is gone (even by SIGKILL): nobody will read our results, so leave at once.
        os._exit(1)


def run_worker_process(
    rank: int, od_config: OmniDiffusionConfig, conn: Connection, cancellations: Connection, num_threads: int
) -> None:
    """Entry point of one worker process: load the model, answer the handshake, serve RPCs."""
    # Ctrl+C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_parent_dies, name="parent-watchdog", daemon=True).start()
    configure_logging(od_config.log_format, f"worker{rank}")

    import torch

    from workers.worker import WorkerWrapperBase

    # One pipeline, one thread pool: CPU ranks split the cores instead of fighting over them.
    torch.set_num_threads(num_threads)
    worker = WorkerWrapperBase(rank, od_config)
    try:
        description = worker.initialize()
    except Exception as error:  # noqa: BLE001 - sent to the parent as one clear line
        conn.send({"status": "error", "error": f"{type(error).__name__}: {error}", "rank": rank})
        conn.close()
        return
    conn.send({"status": "ready", **description})
    threading.Thread(target=_read_cancellations, args=(worker, cancellations), name="cancellations", daemon=True).start()
    try:
        _serve(worker, conn)
    finally:
        worker.shutdown()


def _read_cancellations(worker: Any, cancellations: Connection) -> None:
    while True:
        try:
            worker.cancel(cancellations.recv())
        except (EOFError, OSError):
            return


def _serve(worker: Any, conn: Connection) -> None:
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed its end
        if call is None:
            return
        # The call's progress goes out at once, tagged with it; only this thread sends on conn.
        worker.progress_sink = lambda progress, call_id=call.call_id: conn.send(RpcProgress(call_id, progress))
        try:
            if call.method.startswith("_"):
                raise AttributeError(f"'{call.method}' is not a public worker method")
            reply = RpcReply(call.call_id, True, getattr(worker, call.method)(*call.args, **call.kwargs))
        except Exception as error:  # noqa: BLE001 - the caller gets the message, the worker lives on
            reply = RpcReply(call.call_id, False, f"{type(error).__name__}: {error}")
        conn.send(reply)
