"""Fair share under a flood, against the real server: one key's flood does not starve another key,
and a key past its share of the queue gets 429 while the others still get in."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from helpers import ENDLESS_STREAM, ServerProcess, poll

pytestmark = pytest.mark.slow

FLOOD_KEY, SINGLE_KEY = "flood-key", "single-key"
# 64x64, 4 steps: the load test.
REQUEST = {"prompt": "a red fox", "size": "64x64", "extra_body": {"num_inference_steps": 4}}
# Seconds a request may take when other processes compete for the cores.
DEADLINE_S = 120


@pytest.fixture(scope="module", params=["request", "step"])
def flooded_server(request):
    """The tiny model, --max-batch-size 8, default caps, two API keys; in each scheduling mode."""
    server = ServerProcess(
        "--model", "tiny", "--max-batch-size", "8", "--api-key", f"{FLOOD_KEY},{SINGLE_KEY}",
        "--scheduling", request.param,
    )
    yield server
    server.stop()


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=DEADLINE_S)


def timed(sdk: openai.OpenAI, n: int) -> float:
    started = time.monotonic()
    sdk.images.generate(n=n, **REQUEST)
    return time.monotonic() - started


def flood_with_singles(server: ServerProcess, single_key: str, singles: int = 12) -> tuple[list[float], list[float]]:
    """The issue's load: FLOOD_KEY sends n=8 from 8 connections while ``single_key`` sends ``singles`` single
    requests one after the other. The latencies of the singles and of the flood's requests."""
    flood_sdk, single_sdk = client(server, FLOOD_KEY), client(server, single_key)
    single_sdk.images.generate(n=1, **REQUEST)  # warm: the first call of a fresh worker is slower
    singles_done = threading.Event()
    flood_latencies: list[float] = []

    def flood() -> None:
        while not singles_done.is_set():
            flood_latencies.append(timed(flood_sdk, 8))

    with ThreadPoolExecutor(8) as pool:
        floods = [pool.submit(flood) for _ in range(8)]
        try:
            # All eight flood connections have a request in: queued, or in a step.
            poll(
                lambda: server.metric("imagegen_num_requests_waiting") + server.metric("imagegen_num_requests_running")
                >= 8,
                DEADLINE_S,
                "the flood to fill the server",
            )
            # One after the other; any 429 raises openai.RateLimitError and fails the test.
            single_latencies = [timed(single_sdk, 1) for _ in range(singles)]
        finally:
            singles_done.set()
        for done in floods:
            done.result(timeout=DEADLINE_S)
    return single_latencies, flood_latencies


def test_a_key_sending_single_requests_is_not_starved_by_a_flood_of_another_key(flooded_server):
    single_latencies, flood_latencies = flood_with_singles(flooded_server, SINGLE_KEY)
    single_p99, flood_p99 = np.percentile(single_latencies, 99), np.percentile(flood_latencies, 99)
    assert single_p99 <= 0.4 * flood_p99, (single_latencies, flood_latencies)


def test_single_requests_sent_with_the_flooding_key_wait_in_arrival_order_like_the_flood(flooded_server):
    # The baseline of the test above: the same load, but the single requests count for the flooding key, so
    # the turns cannot help them. In arrival order their p99 is close to the flood's; this proves the 0.4
    # bound above can fail. Each waits behind the flood's queue, so four of them are enough, and cheaper.
    single_latencies, flood_latencies = flood_with_singles(flooded_server, FLOOD_KEY, singles=4)
    single_p99, flood_p99 = np.percentile(single_latencies, 99), np.percentile(flood_latencies, 99)
    assert single_p99 >= 0.6 * flood_p99, (single_latencies, flood_latencies)


@pytest.fixture(scope="module")
def capped_server():
    """A key may have 2 images waiting; requests may run until their client hangs up. In request mode, so that a
    running request holds the worker and the next ones wait in the queue (in step mode they would join it)."""
    server = ServerProcess(
        "--model", "tiny", "--api-key", f"{FLOOD_KEY},{SINGLE_KEY}", "--max-queued-images-per-key", "2",
        "--max-num-inference-steps", str(ENDLESS_STREAM["num_inference_steps"]), "--scheduling", "request",
    )
    yield server
    server.stop()


def test_a_key_past_its_share_gets_429_with_retry_after_while_another_key_gets_in(capped_server):
    server = capped_server
    url = f"{server.base_url}/v1/images/generations"
    short = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2}
    flood = httpx.Client(timeout=DEADLINE_S, headers={"Authorization": f"Bearer {FLOOD_KEY}"})
    single = httpx.Client(timeout=DEADLINE_S, headers={"Authorization": f"Bearer {SINGLE_KEY}"})
    # Runs until it is closed; a step is running, so what comes next waits in the queue.
    running = flood.send(flood.build_request("POST", url, json=ENDLESS_STREAM), stream=True)
    with ThreadPoolExecutor(2) as pool:
        try:
            assert running.status_code == 200
            waiting_before = server.metric("imagegen_num_requests_waiting")
            queued = pool.submit(flood.post, url, json={**short, "n": 2})
            poll(lambda: server.metric("imagegen_num_requests_waiting") == waiting_before + 1, 60, "n=2 to queue")

            refused = flood.post(url, json=short)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert refused.headers["x-ratelimit-limit-requests"] == "2"
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"
            assert refused.headers["x-ratelimit-reset-requests"].endswith("s")

            # The other key still gets in, even with more images than the cap: it had nothing waiting.
            admitted = pool.submit(single.post, url, json={**short, "n": 3})
            poll(lambda: server.metric("imagegen_num_requests_waiting") == waiting_before + 2, 60, "it to queue")
        finally:
            running.close()  # the endless request stops at its next step; the queued ones run
    assert queued.result(timeout=DEADLINE_S).status_code == 200
    answer = admitted.result(timeout=DEADLINE_S)
    assert answer.status_code == 200
    # Its own share: nothing of its is waiting any more.
    assert answer.headers["x-ratelimit-limit-requests"] == "2"
    assert answer.headers["x-ratelimit-remaining-requests"] == "2"
    assert answer.headers["x-ratelimit-reset-requests"] == "0ms"
    flood.close()
    single.close()
