"""Faults with several models behind one server (docs/models.md): a worker killed in one model restarts that
model's workers only, and a server told to stop while a request waits for its model to load lets it finish.
Real servers, real mp workers."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import ServerProcess, poll

pytestmark = pytest.mark.slow

SHORT = {"num_inference_steps": 2, "seed": 3}


def status_of(server: ServerProcess, model: str) -> str:
    return httpx.get(f"{server.base_url}/v1/models/{model}", timeout=30).json()["status"]


def test_a_worker_killed_in_one_model_restarts_that_models_workers_only():
    server = ServerProcess("--model", "tiny", "tiny-flux", "--on-worker-death", "restart")
    try:
        tiny_workers = set(server.worker_pids())  # tiny is preloaded, tiny-flux loads on its first request
        assert server.post(model="tiny-flux", **SHORT).status_code == 200
        flux_workers = set(server.worker_pids()) - tiny_workers
        assert len(tiny_workers) == 1 and len(flux_workers) == 1
        tiny_restarts = server.metric("imagegen_worker_restarts_total", model_name="tiny")
        flux_restarts = server.metric("imagegen_worker_restarts_total", model_name="tiny-flux")

        os.kill(next(iter(tiny_workers)), signal.SIGKILL)
        poll(lambda: server.metric("imagegen_worker_up", model_name="tiny") == 0, 30, "tiny's worker death noticed")
        # While tiny's worker restarts, tiny-flux serves on, on the same worker.
        assert server.post(model="tiny-flux", **SHORT).status_code == 200
        assert flux_workers <= set(server.worker_pids())

        poll(lambda: server.metric("imagegen_worker_up", model_name="tiny") == 1, 120, "tiny's worker restarted")
        assert server.post(model="tiny", **SHORT).status_code == 200
        workers = set(server.worker_pids())
        assert flux_workers <= workers and not tiny_workers & workers
        assert len(workers) == 2
        assert server.metric("imagegen_worker_restarts_total", model_name="tiny") == tiny_restarts + 1
        assert server.metric("imagegen_worker_restarts_total", model_name="tiny-flux") == flux_restarts
        assert status_of(server, "tiny") == status_of(server, "tiny-flux") == "loaded"
    finally:
        server.stop()


def test_stopping_the_server_lets_a_request_waiting_for_its_model_load_finish():
    server = ServerProcess("--model", "tiny", "tiny-flux")
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.post, timeout=300, model="tiny-flux", **SHORT)
            poll(lambda: status_of(server, "tiny-flux") == "loading", 60, "tiny-flux to start loading")
            server.process.send_signal(signal.SIGTERM)  # drain: new requests 503, held ones finish
            response = waiting.result(timeout=300)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 1
        assert server.process.wait(timeout=120) == 0
    finally:
        server.stop()


def test_a_request_still_waiting_for_its_model_load_when_the_drain_time_runs_out_gets_503():
    # tiny-flux's worker takes seconds to start (a new Python importing torch): longer than the drain's second.
    server = ServerProcess("--model", "tiny", "tiny-flux", "--shutdown-timeout-s", "1")
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.post, timeout=300, model="tiny-flux", **SHORT)
            poll(lambda: status_of(server, "tiny-flux") == "loading", 60, "tiny-flux to start loading")
            server.process.send_signal(signal.SIGTERM)
            response = waiting.result(timeout=300)
        assert response.status_code == 503, response.text
        assert "shutting down" in response.json()["error"]["message"]
        assert server.process.wait(timeout=120) == 0
    finally:
        server.stop()
