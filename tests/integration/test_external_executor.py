"""ExternalDiffusionExecutor: the guide's custom executor, written against our names, with workers of its own.

The workers here are plain processes that someone other than the engine starts (this module's
fixture); each serves RPCs on a loopback socket and registers its address in a directory, which
stands in for Kubernetes' service discovery in the guide's example.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from multiprocessing.connection import Client, Listener, wait
from pathlib import Path

import numpy as np
import pytest
from helpers import pid_alive, poll

from engine import DiffusionEngine, EngineDeadError, OmniDiffusionConfig, OmniDiffusionRequest
from executors import ExternalDiffusionExecutor, RpcTimeoutError, WorkerRpcError, get_executor_class

AUTHKEY = b"imagegen-test"
REGISTRY_ENV = "IMAGEGEN_TEST_WORKER_REGISTRY"


# -- the workers: started and stopped by the test, not by the engine ---------------------------------
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


# -- the executor, shaped like the guide's KubernetesExternalExecutor ---------------------------------
class RegistryExternalExecutor(ExternalDiffusionExecutor):
    """Custom executor for workers registered in a directory."""

    def _connect_to_workers(self):
        # Discover workers via the registry (the guide asks Kubernetes for pods here).
        registry = Path(os.environ[REGISTRY_ENV])
        entries = sorted((json.loads(p.read_text()) for p in registry.glob("rank-*.json")), key=lambda e: e["rank"])
        # Connect to each worker
        for entry in entries:
            worker = Client((entry["host"], entry["port"]), authkey=AUTHKEY)
            self.worker_handles.append(worker)

    def _forward_rpc_to_workers(self, method, timeout, args, kwargs, unique_reply_rank):
        responses = []
        workers = [self.worker_handles[unique_reply_rank]] if unique_reply_rank is not None else self.worker_handles
        for worker in workers:
            worker.send((method, args, kwargs))
        for worker in workers:
            if not worker.poll(timeout):
                raise TimeoutError(f"no reply within {timeout}s")
            status, value = worker.recv()
            if status == "error":
                raise RuntimeError(value)
            responses.append(value)
        return responses[0] if unique_reply_rank is not None else responses

    def _disconnect_from_workers(self):
        for worker in self.worker_handles:
            worker.close()
        self.worker_handles = []


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


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    processes = start_workers(registry, 2)
    yield registry, processes
    stop_workers(processes)


@pytest.fixture
def registry_env(two_workers, monkeypatch):
    monkeypatch.setenv(REGISTRY_ENV, str(two_workers[0]))
    return two_workers[1]


def custom_engine(num_ranks: int = 2) -> DiffusionEngine:
    return DiffusionEngine(
        OmniDiffusionConfig(model="tiny", num_gpus=num_ranks, distributed_executor_backend=RegistryExternalExecutor)
    )


def requests_for(seeds) -> list[OmniDiffusionRequest]:
    return [OmniDiffusionRequest("a red fox", num_inference_steps=4, seed=seed) for seed in seeds]


def pixels(outputs) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for output in outputs for image in output.images]


# -- tests -------------------------------------------------------------------------------------------
def test_external_launcher_without_a_subclass_says_what_to_implement():
    config = OmniDiffusionConfig(model="tiny", distributed_executor_backend="external_launcher")
    assert get_executor_class("external_launcher") is ExternalDiffusionExecutor
    with pytest.raises(NotImplementedError) as error:
        DiffusionEngine(config)
    message = str(error.value)
    assert "subclass of executors.ExternalDiffusionExecutor" in message
    assert "implements _connect_to_workers and _forward_rpc_to_workers" in message


def test_subclass_without_forwarding_is_told_which_method_is_missing():
    class ConnectOnly(ExternalDiffusionExecutor):
        def _connect_to_workers(self):
            self.worker_handles.append(object())

    with pytest.raises(NotImplementedError, match=r"implements _forward_rpc_to_workers \(and may override"):
        DiffusionEngine(OmniDiffusionConfig(model="tiny", distributed_executor_backend=ConnectOnly))


@pytest.mark.slow
def test_custom_executor_generates_through_its_own_workers(registry_env):
    with custom_engine() as engine:
        assert engine.collective_rpc("get_rank") == [0, 1]
        assert engine.collective_rpc("get_rank", unique_reply_rank=1) == 1
        outputs = engine.step(requests_for(range(4)))
        engine.check_health()
    assert [o.error for o in outputs] == [None] * 4
    assert {o.rank for o in outputs} == {0, 1}
    # The same class named as 'package.module:Class' (as --backend takes it).
    with DiffusionEngine(
        OmniDiffusionConfig(
            model="tiny", num_gpus=2, distributed_executor_backend=f"{__name__}:RegistryExternalExecutor"
        )
    ) as engine:
        assert isinstance(engine.executor, RegistryExternalExecutor)
        again = engine.step(requests_for(range(4)))
    assert all(np.array_equal(a, b) for a, b in zip(pixels(outputs), pixels(again), strict=True))


@pytest.mark.slow
def test_partial_images_of_workers_that_cannot_stream_come_with_their_reply(registry_env):
    requests = [OmniDiffusionRequest("a red fox", num_inference_steps=8, seed=seed, partial_images=2) for seed in (1, 2)]
    with custom_engine() as engine:
        partials = []
        engine.progress_listeners.append(partials.append)
        outputs = engine.step(requests)
    assert [o.error for o in outputs] == [None, None]
    # Each once, in order, before the step returned.
    assert [(p.request_id, p.index) for p in partials] == [(r.request_id, i) for r in requests for i in (0, 1)]
    assert all([image.size for image in p.images] == [(64, 64)] for p in partials)


@pytest.mark.slow
def test_closing_the_engine_disconnects_and_leaves_the_workers_running(registry_env):
    engine = custom_engine()
    engine.close()
    engine.close()
    assert all(pid_alive(process.pid) for process in registry_env)
    with pytest.raises(EngineDeadError):
        engine.check_health()
    with custom_engine() as engine:
        assert engine.collective_rpc("get_rank") == [0, 1]


@pytest.mark.slow
def test_forwarding_errors_become_executor_errors(registry_env):
    with custom_engine() as engine:
        with pytest.raises(WorkerRpcError, match="RPC 'no_such_method' failed: RuntimeError: AttributeError"):
            engine.collective_rpc("no_such_method")


@pytest.mark.slow
def test_timeout_and_dead_worker_map_to_executor_errors(tmp_path, monkeypatch):
    processes = start_workers(tmp_path, 1)
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path))
    try:
        with custom_engine(num_ranks=1) as engine:
            big = [engine.prepare(r) for r in requests_for(range(8))]
            with pytest.raises(RpcTimeoutError, match=r"RPC 'generate' timed out after 0.01s"):
                engine.collective_rpc("generate", timeout=0.01, args=(big,))
            processes[0].kill()
            processes[0].join()
            # The default health check asks every worker for its rank; a dead one answers nothing.
            with pytest.raises(EngineDeadError, match="worker health check failed"):
                engine.check_health()
    finally:
        stop_workers(processes)
