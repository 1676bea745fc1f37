"""Dead, hung and failing workers, with the real server and real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import ROOT, ServerProcess, pid_alive, poll, run_cli, worker_pids_of

pytestmark = pytest.mark.slow

# A request that keeps the tiny model busy for seconds on this machine's CPUs.
SLOW = {"size": "128x128", "num_inference_steps": 40}


def start_slow_request(server: ServerProcess, pool: ThreadPoolExecutor, **body):
    running_before = server.metric("imagegen_num_requests_running")
    future = pool.submit(server.post, **{**SLOW, **body})
    poll(lambda: server.metric("imagegen_num_requests_running") > running_before, 30, "the request to start running")
    return future


@pytest.fixture(scope="module")
def restarting_server():
    """One server whose worker the tests kill: each begins once it is ready again."""
    server = ServerProcess("--on-worker-death", "restart")
    yield server
    server.stop()


def ready(server: ServerProcess) -> bool:
    return httpx.get(f"{server.base_url}/ready").status_code == 200


def test_killed_worker_fails_inflight_with_503_then_restarts(restarting_server):
    server = restarting_server
    poll(lambda: ready(server), 60, "/ready before the test")
    restarts = server.metric("imagegen_worker_restarts_total")
    (worker,) = server.worker_pids()
    with ThreadPoolExecutor(2) as pool:
        inflight = start_slow_request(server, pool)
        os.kill(worker, signal.SIGKILL)
        response = inflight.result(timeout=5)
        # Sent while the worker is down: it waits in the queue for the replacement.
        during_restart = pool.submit(server.post, num_inference_steps=2, seed=1)
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "rank 0" in message and "SIGKILL" in message
        assert httpx.get(f"{server.base_url}/health").status_code == 200  # alive: restarting, not dead
        assert during_restart.result(timeout=120).status_code == 200
    poll(lambda: ready(server), 60, "/ready after the restart")
    (replacement,) = server.worker_pids()
    assert replacement != worker
    assert server.metric("imagegen_worker_restarts_total") == restarts + 1
    assert server.metric("imagegen_worker_up", rank="0") == 1
    assert server.post(num_inference_steps=2).status_code == 200


def test_worker_killed_after_the_first_partial_image_ends_the_stream_with_an_error_event(restarting_server):
    server = restarting_server
    poll(lambda: ready(server), 60, "/ready before the test")
    (worker,) = server.worker_pids()
    body = {"prompt": "a red fox", **SLOW, "num_inference_steps": 150, "partial_images": 3, "stream": True}
    url = f"{server.base_url}/v1/images/generations"
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("event: ")) == "event: image_generation.partial_image"
        # The 200 is sent: the failure can only be told in the stream, as OpenAI's error event.
        os.kill(worker, signal.SIGKILL)
        rest = [line for line in lines if line]
    assert [line for line in rest if line.startswith("event: ")] == ["event: error"]
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error"
    assert "rank 0" in error["message"] and "SIGKILL" in error["message"]


def test_ready_is_503_while_a_worker_restarts(restarting_server):
    server = restarting_server
    poll(lambda: ready(server), 60, "/ready before the test")
    (worker,) = server.worker_pids()
    os.kill(worker, signal.SIGKILL)
    poll(lambda: not ready(server), 10, "/ready to turn 503")
    poll(lambda: ready(server), 60, "/ready to recover")


def test_exit_policy_makes_the_server_exit_nonzero_without_orphans():
    server = ServerProcess("--on-worker-death", "exit")
    try:
        (worker,) = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        server.process.wait(timeout=30)
        assert server.process.returncode not in (0, None)
        assert "worker rank 0 died" in server.output()
        assert not pid_alive(worker)
    finally:
        server.stop()


def test_hung_worker_fails_with_504_and_is_replaced():
    server = ServerProcess("--rpc-timeout-s", "4")
    try:
        (worker,) = server.worker_pids()
        with ThreadPoolExecutor(1) as pool:
            inflight = start_slow_request(server, pool)
            os.kill(worker, signal.SIGSTOP)  # hangs it: alive, but never answers
            response = inflight.result(timeout=30)
        assert response.status_code == 504
        assert "timed out after 4s" in response.json()["error"]["message"]
        poll(lambda: not pid_alive(worker), 30, "the hung worker to be killed")
        poll(lambda: httpx.get(f"{server.base_url}/ready").status_code == 200, 60, "the replacement")
        assert server.post(num_inference_steps=2).status_code == 200
        assert server.metric("imagegen_requests_timed_out_total") >= 1
    finally:
        server.stop()


def test_workers_exit_when_the_server_is_killed():
    server = ServerProcess("--num-gpus", "2")
    workers = server.worker_pids()
    assert len(workers) == 2
    server.process.kill()
    server.process.wait()
    poll(lambda: not any(pid_alive(pid) for pid in workers), 15, "orphaned workers to exit")
    server.stop()


def test_sigterm_finishes_inflight_requests_refuses_new_ones_and_exits_zero():
    server = ServerProcess("--shutdown-timeout-s", "60", "--max-batch-size", "1")
    try:
        workers = server.worker_pids()
        with ThreadPoolExecutor(3) as pool:
            # Each runs for a few seconds: the drain below begins while both are in flight.
            inflight = [start_slow_request(server, pool, seed=seed, num_inference_steps=20) for seed in (1, 2)]
            server.process.send_signal(signal.SIGTERM)
            poll(lambda: httpx.get(f"{server.base_url}/ready").status_code == 503, 30, "draining to begin")
            refused = server.post(num_inference_steps=2)
            assert refused.status_code == 503
            assert [f.result(timeout=120).status_code for f in inflight] == [200, 200]
        assert server.process.wait(timeout=60) == 0
        poll(lambda: not any(pid_alive(pid) for pid in workers), 30, "workers to exit")
    finally:
        server.stop()


def test_broken_model_folder_fails_startup_with_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    result = run_cli("serve", "--model", str(tmp_path), "--port", "0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("imagegen:")]
    assert len(lines) == 1 and "failed to start" in lines[0]


def test_worker_killed_while_loading_fails_startup_with_one_line(tmp_path):
    # A private model cache: the worker has to build the model, which keeps it loading for longer.
    command = [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--model-cache-dir", str(tmp_path)]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        poll(lambda: worker_pids_of(server.pid), 30, "the worker process to start")
        (worker,) = worker_pids_of(server.pid)
        os.kill(worker, signal.SIGKILL)
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 1
    lines = [line for line in stderr.splitlines() if line.startswith("imagegen:")]
    assert len(lines) == 1 and "exited while starting (killed by SIGKILL)" in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
