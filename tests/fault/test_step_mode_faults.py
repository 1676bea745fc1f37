"""A worker that dies with a running set (--scheduling step): the real server, real worker processes."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import ServerProcess, poll

pytestmark = pytest.mark.slow


def test_killed_worker_fails_its_whole_running_set_with_503_then_restarts():
    server = ServerProcess("--scheduling", "step", "--on-worker-death", "restart")
    try:
        (worker,) = server.worker_pids()
        assert "--scheduling step: each worker runs a running set" in server.output()
        with ThreadPoolExecutor(2) as pool:
            long_ones = [
                pool.submit(server.post, size="128x128", num_inference_steps=steps, seed=seed)
                for seed, steps in ((1, 40), (2, 30))
            ]
            poll(lambda: server.metric("imagegen_num_requests_running") == 2, 30, "both requests to be running")
            os.kill(worker, signal.SIGKILL)
            responses = [future.result(timeout=30) for future in long_ones]
        for response in responses:
            assert response.status_code == 503
            assert "rank 0" in response.json()["error"]["message"]
        poll(lambda: len(server.worker_pids()) == 1 and server.worker_pids() != [worker], 60, "a new worker")
        assert server.post(num_inference_steps=2).status_code == 200
        assert server.metric("imagegen_worker_restarts_total") == 1
    finally:
        server.stop()
