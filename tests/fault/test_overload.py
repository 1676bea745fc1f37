"""Overload, deadlines, abusive input and clients that go away, against the real server."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx
import pytest
from helpers import ENDLESS_STREAM, ServerProcess, poll, scheduling_by_default

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def request_mode():
    """A long request holds the worker while the next ones wait in the queue: request mode's batches (in step
    mode they would join its running set)."""
    with scheduling_by_default("request"):
        yield

# Seconds a request may take to answer when other processes compete for the cores.
DEADLINE_S = 300


@pytest.fixture(scope="module")
def small_queue_server():
    server = ServerProcess(
        "--max-batch-size", "1", "--max-queue-size", "2", "--max-request-body-bytes", "4096",
        "--max-prompt-length", "100", "--max-num-inference-steps", str(ENDLESS_STREAM["num_inference_steps"]),
    )
    yield server
    server.stop()


def wait_until(server: ServerProcess, metric: str, value: float) -> None:
    poll(lambda: server.metric(metric) >= value, 30, f"{metric} >= {value}")


@contextlib.contextmanager
def worker_kept_busy(server: ServerProcess, pool: ThreadPoolExecutor, count: int):
    """``count`` requests that run until their client hangs up hold the one worker of a
    --max-batch-size 1 server (one runs, the others wait at the worker) until the block ends. Then
    each client hangs up and its request stops at its next step: the worker is free again."""
    client = httpx.Client(timeout=DEADLINE_S)
    request = client.build_request("POST", f"{server.base_url}/v1/images/generations", json=ENDLESS_STREAM)
    streams = [pool.submit(client.send, request, stream=True) for _ in range(count)]
    try:
        wait_until(server, "imagegen_num_requests_running", count)
        yield
    finally:
        # A stream's headers come with its first step: the running one first, then the one freed for.
        for stream in as_completed(streams, timeout=DEADLINE_S):
            stream.result().close()
        client.close()


def test_full_queue_gets_429_with_retry_after_at_once(small_queue_server):
    server = small_queue_server
    with ThreadPoolExecutor(3) as pool:
        with worker_kept_busy(server, pool, 2):
            # Both places at the worker are taken; then the queue takes two images.
            queued = pool.submit(server.post, n=2, num_inference_steps=2, timeout=DEADLINE_S)
            wait_until(server, "imagegen_num_requests_waiting", 1)
            refused = server.post(num_inference_steps=2, timeout=5)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert server.metric("imagegen_requests_rejected_total") >= 1
        # Nothing in flight was lost: the queued request runs once the worker is free.
        assert queued.result(timeout=DEADLINE_S).status_code == 200


def test_oversized_body_gets_413(small_queue_server):
    response = httpx.post(
        f"{small_queue_server.base_url}/v1/images/generations",
        json={"prompt": "x" * 10_000},
        timeout=10,
    )
    assert response.status_code == 413
    assert response.json()["error"]["message"]


def test_chunked_oversized_body_gets_413(small_queue_server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}'

    response = httpx.post(
        f"{small_queue_server.base_url}/v1/images/generations",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 413


def test_prompt_over_the_limit_gets_400_naming_prompt(small_queue_server):
    response = small_queue_server.post(prompt="y" * 101, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_request_queued_past_its_deadline_gets_504_and_never_runs():
    server = ServerProcess(
        "--max-batch-size", "1", "--request-timeout-s", "2",
        "--max-num-inference-steps", str(ENDLESS_STREAM["num_inference_steps"]),
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            with worker_kept_busy(server, pool, 2):
                late = server.post(num_inference_steps=2, timeout=60)
                assert late.status_code == 504
                assert "queue" in late.json()["error"]["message"]
        # A request sent now queues behind the late one if it were still there: once it is answered, the
        # late one has had every chance to run, and it made no image.
        assert server.post(num_inference_steps=2, timeout=60).status_code == 200
        assert server.metric("imagegen_images_generated_total") == 1
        assert server.metric("imagegen_requests_timed_out_total") == 1
    finally:
        server.stop()


def test_clients_that_time_out_leave_the_queue_and_the_server_stays_responsive():
    server = ServerProcess("--max-queue-size", "1000")
    endpoint = {"endpoint": "/v1/images/generations"}
    try:
        async def impatient_clients() -> int:
            limits = httpx.Limits(max_connections=200)
            # Patient while connecting and sending, so that every request reaches the server even on a
            # busy machine; impatient for the answer.
            timeout = httpx.Timeout(0.2, connect=30, write=30, pool=30)
            async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
                async def one(seed: int) -> bool:
                    try:
                        await client.post(
                            f"{server.base_url}/v1/images/generations",
                            json={"prompt": "a fox", "size": "64x64", "num_inference_steps": 4, "seed": seed},
                        )
                        return False
                    except httpx.TimeoutException:
                        return True

                return sum(await asyncio.gather(*(one(seed) for seed in range(200))))

        timed_out = asyncio.run(impatient_clients())
        assert timed_out > 150
        poll(lambda: server.metric("imagegen_num_requests_waiting") == 0, 30, "the queue to empty")
        poll(lambda: server.metric("imagegen_num_requests_running") == 0, 60, "running steps to end")
        # What the server saw: every request it received was either answered or cancelled when its
        # client left (a step holds at most 8 images, of which a few may finish for clients long gone).
        poll(lambda: server.metric("imagegen_requests_total", **endpoint) >= 150, 30, "the requests to be counted")
        received = server.metric("imagegen_requests_total", **endpoint)
        answered = server.metric("imagegen_requests_total", status="200", **endpoint)
        assert server.metric("imagegen_requests_cancelled_total") >= received - answered - 16
        # The abandoned requests were not generated; a normal request is served.
        assert server.metric("imagegen_images_generated_total") < 100
        assert server.post(num_inference_steps=2, timeout=60).status_code == 200
    finally:
        server.stop()


def test_a_running_request_whose_client_leaves_stops_at_the_next_denoising_step(small_queue_server):
    server = small_queue_server
    images_before = server.metric("imagegen_images_generated_total")
    with ThreadPoolExecutor(1) as pool:
        # Well over a minute of denoising on this machine if it ran to the end.
        abandoned = pool.submit(server.post, size="128x128", num_inference_steps=150, timeout=3)
        poll(lambda: server.metric("imagegen_num_requests_running") == 1, 30, "the request to start running")
        with pytest.raises(httpx.TimeoutException):
            abandoned.result(timeout=60)
    poll(lambda: server.metric("imagegen_num_requests_running") == 0, 20, "the step to stop early")
    assert server.metric("imagegen_images_generated_total") == images_before  # its images were dropped
    assert server.post(num_inference_steps=2, timeout=60).status_code == 200


def test_a_client_that_hangs_up_is_logged_499_and_counted_cancelled_without_a_server_error(small_queue_server):
    server = small_queue_server
    log_start = len(server.output())
    cancelled_before = server.metric("imagegen_requests_cancelled_total")
    server_errors_before = server.metric("imagegen_requests_total", status="500")
    hang_ups_before = server.metric("imagegen_requests_total", status="499")
    with ThreadPoolExecutor(2) as pool:
        # A stream that hangs up once it has started; a request sent behind it hangs up before its answer.
        with worker_kept_busy(server, pool, 1):
            with pytest.raises(httpx.TimeoutException):
                server.post(num_inference_steps=2, timeout=2)
    poll(
        lambda: server.metric("imagegen_requests_cancelled_total") >= cancelled_before + 2,
        30,
        "both requests to be cancelled",
    )
    poll(lambda: server.metric("imagegen_requests_total", status="499") > hang_ups_before, 30, "the 499 to be counted")
    log = server.output()[log_start:]
    assert "Traceback" not in log and "status=500" not in log, log
    assert "status=499" in log
    assert server.metric("imagegen_requests_total", status="500") == server_errors_before
