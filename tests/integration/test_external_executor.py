"""ExternalDiffusionExecutor's behaviour (errors, timeouts, disconnects, partial images) with workers it does not own.

The workers are tests/local_workers.py's processes; the executor below reaches them through a
directory of addresses. The guide's own custom executor, as the guide writes it, is in
test_guide_examples.py.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Client
from pathlib import Path

import pytest
from helpers import pid_alive
from local_workers import AUTHKEY, registered_workers, start_workers, stop_workers

from engine import DiffusionEngine, EngineDeadError, OmniDiffusionConfig, OmniDiffusionRequest
from executors import ExternalDiffusionExecutor, RpcTimeoutError, WorkerRpcError

REGISTRY_ENV = "IMAGEGEN_TEST_WORKER_REGISTRY"


# -- the executor ------------------------------------------------------------------------------------
class RegistryExternalExecutor(ExternalDiffusionExecutor):
    """Custom executor for workers registered in a directory; all of them take a call at once."""

    def _connect_to_workers(self):
        for entry in registered_workers(Path(os.environ[REGISTRY_ENV])):
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


# -- tests -------------------------------------------------------------------------------------------
def test_subclass_without_forwarding_is_told_which_method_is_missing():
    class ConnectOnly(ExternalDiffusionExecutor):
        def _connect_to_workers(self):
            self.worker_handles.append(object())

    with pytest.raises(NotImplementedError, match=r"implements _forward_rpc_to_workers \(and may override"):
        DiffusionEngine(OmniDiffusionConfig(model="tiny", distributed_executor_backend=ConnectOnly))


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
