"""Workers that someone other than the engine starts and stops, for the custom-executor tests.

Each is a process that loads the model, serves (method, args, kwargs) calls on a loopback socket
(multiprocessing's authenticated connection: an HMAC handshake on AUTHKEY comes before any data),
and registers its address in a directory, which stands in for Kubernetes' service discovery in the
guide's custom executor.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from multiprocessing.connection import Listener, wait
from pathlib import Path

from helpers import poll

from engine import OmniDiffusionConfig

AUTHKEY = b"imagegen-test"


def registered_workers(registry: Path) -> list[dict]:
    """The registry's entries ({"rank", "host", "port"}), in rank order."""
    return sorted((json.loads(p.read_text()) for p in Path(registry).glob("rank-*.json")), key=lambda e: e["rank"])


def serve_worker(rank: int, od_config: OmniDiffusionConfig, registry: str) -> None:
    """Load the model, register host:port in ``registry``, then answer (method, args, kwargs) calls."""
    import torch

    from workers.worker import WorkerWrapperBase

    parent = multiprocessing.parent_process()
    # Leave with the test process, however it ends.
    threading.Thread(target=lambda: (wait([parent.sentinel]), os._exit(1)), daemon=True).start()
    torch.set_num_threads(1)
    worker = WorkerWrapperBase(rank, od_config)
    worker.initialize()
    with Listener(("127.0.0.1", 0), authkey=AUTHKEY) as listener:
        host, port = listener.address
        entry = Path(registry, f"rank-{rank}.json")
        entry.with_suffix(".tmp").write_text(json.dumps({"rank": rank, "host": host, "port": port}))
        entry.with_suffix(".tmp").rename(entry)
        while True:  # one engine at a time; the next one connects after the last disconnected
            with listener.accept() as conn:
                while True:
                    try:
                        method, args, kwargs = conn.recv()
                    except (EOFError, OSError):
                        break
                    try:
                        conn.send(("ok", getattr(worker, method)(*args, **kwargs)))
                    except Exception as error:  # noqa: BLE001 - the caller gets it
                        conn.send(("error", f"{type(error).__name__}: {error}"))


def start_workers(registry: Path, num_ranks: int) -> list[multiprocessing.Process]:
    context = multiprocessing.get_context("spawn")
    config = OmniDiffusionConfig(model="tiny", num_gpus=num_ranks)
    processes = [
        context.Process(target=serve_worker, args=(rank, config, str(registry)), daemon=True)
        for rank in range(num_ranks)
    ]
    for process in processes:
        process.start()

    def registered() -> bool:
        for process in processes:
            if not process.is_alive():
                raise AssertionError(f"worker exited with {process.exitcode}")
        return len(list(registry.glob("rank-*.json"))) == num_ranks

    poll(registered, 120, "the workers to register")
    return processes


def stop_workers(processes: list[multiprocessing.Process]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
