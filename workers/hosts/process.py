"""The mp worker program (``python -m workers.hosts.process``) that MultiProcDiffusionExecutor starts, and its
wire protocol.

Each worker is a program of its own, not a multiprocessing child: it never imports the module
that started the engine, so a plain script without an ``if __name__ == "__main__":`` guard can
start workers. The executor hands it two inherited file descriptors:

- the call pipe (duplex). Parent -> worker: first the worker's settings (a JSON-able dict), then
  ``RpcCall`` or ``None`` (shut down). Worker -> parent: the handshake ``{"status": "ready", ...}``
  or ``{"status": "error", "error": ...}``, then one ``RpcReply`` per call, in any order the parent
  matches by ``call_id``, each after the ``RpcProgress`` messages (partial images, step progress)
  that its call sent.
- the cancellation pipe (one way): lists of request ids to cancel. A thread reads it, because the
  main thread is busy in the pipeline exactly when a cancel matters. Its end of file means the
  engine is gone (however it ended), and the worker leaves at once.

Both pipes stay on this machine, between a parent and the child it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from workers.config import OmniDiffusionConfig
from workers.data import WorkerProgress
from workers.hosts.streaming import PipelineThread
from workers.logs import configure_logging

logger = logging.getLogger(__name__)


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


def worker_settings(od_config: OmniDiffusionConfig) -> dict:
    """The settings a worker program is started with, as plain data.

    The executor backend stays behind: it may be a class defined in the caller's own script,
    which the worker program does not import (and does not need).
    """
    return od_config.model_dump(mode="json", exclude={"distributed_executor_backend"})


def run_worker(rank: int, conn: Connection, cancellations: Connection, num_threads: int) -> None:
    """Load the model, answer the handshake, serve RPCs until told to stop or the engine is gone."""
    # Ctrl+C reaches the whole process group; the engine decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    od_config = OmniDiffusionConfig(**conn.recv())
    configure_logging(od_config.log_format, f"worker{rank}")

    import torch

    from workers.worker import WorkerWrapperBase

    # One pipeline, one thread pool: CPU ranks split the cores instead of fighting over them.
    torch.set_num_threads(num_threads)
    worker = WorkerWrapperBase(rank, od_config)
    reader = threading.Thread(target=_read_cancellations, args=(worker, cancellations), name="cancellations", daemon=True)
    reader.start()
    try:
        description = worker.initialize()
    except Exception as error:  # noqa: BLE001 - sent to the engine as one clear line
        conn.send({"status": "error", "error": f"{type(error).__name__}: {error}", "rank": rank})
        conn.close()
        return
    conn.send({"status": "ready", **description})
    try:
        _serve(worker, conn)
    finally:
        worker.shutdown()


def _read_cancellations(worker: Any, cancellations: Connection) -> None:
    while True:
        try:
            request_ids = cancellations.recv()
        except (EOFError, OSError):
            # The engine closed its end, or died (even by SIGKILL): nobody will read our results.
            os._exit(1)
        worker.cancel(request_ids)


def _serve(worker: Any, conn: Connection) -> None:
    """Answer calls on this thread (the one that loaded the model), in order; in step mode, generate
    calls are answered as their requests finish (see workers.hosts.streaming.PipelineThread). A thread reads
    the calls; this one and the encode pool's threads send on ``conn``, one message at a time."""
    pipeline = PipelineThread(worker)
    pipeline.use_step_loop()
    # The pipeline thread and the encode pool's threads send (progress, replies): one message at a time.
    sending = threading.Lock()

    def send(message: Any) -> None:
        with sending:
            conn.send(message)

    def read_calls() -> None:
        while True:
            try:
                call = conn.recv()
            except (EOFError, OSError):
                call = None  # the engine closed its end
            if call is None:
                pipeline.shutdown(wait=False)
                return
            pipeline.call(
                call.method,
                call.args,
                call.kwargs,
                sink=lambda progress, call_id=call.call_id: send(RpcProgress(call_id, progress)),
                on_done=lambda future, call_id=call.call_id: send(_reply(call_id, future)),
            )

    threading.Thread(target=read_calls, name="calls", daemon=True).start()
    pipeline.run()


def _reply(call_id: int, future: Future) -> RpcReply:
    error = future.exception()
    if error is not None:
        return RpcReply(call_id, False, f"{type(error).__name__}: {error}")
    return RpcReply(call_id, True, future.result())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.hosts.process", description="one mp worker, started by the engine")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--call-fd", type=int, required=True, help="inherited descriptor of the call pipe")
    parser.add_argument("--cancel-fd", type=int, required=True, help="inherited descriptor of the cancellation pipe")
    parser.add_argument("--num-threads", type=int, required=True)
    args = parser.parse_args(argv)
    run_worker(args.rank, Connection(args.call_fd), Connection(args.cancel_fd, writable=False), args.num_threads)


if __name__ == "__main__":
    # Run as a program, this file is __main__; the message classes must be workers.hosts.process's own,
    # the names the engine unpickles them by.
    from workers.hosts.process import main as program_main
    from workers.logs import exit_at_once

    program_main()
    exit_at_once(0)
