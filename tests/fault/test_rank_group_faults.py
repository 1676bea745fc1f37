"""A CFG pair behind the real HTTP server (backend mp): the official client gets one rank's pixels, and a
dead rank takes its whole group down and back up, never failing silently."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from helpers import ServerProcess, assert_pixels_close, decode, pid_alive, poll

from engine import OmniDiffusionConfig, OmniDiffusionRequest
from workers.worker import WorkerWrapperBase

pytestmark = pytest.mark.slow

GUIDED = {"seed": 3, "num_inference_steps": 4, "guidance_scale": 6.0}


def rank_of(pid: int) -> int:
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(arguments[arguments.index(b"--rank") + 1])


def test_a_pair_serves_the_client_and_a_killed_rank_restarts_the_whole_pair():
    server = ServerProcess("--model", "tiny", "--num-gpus", "2", "--cfg-parallel-size", "2")
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        answer = client.images.generate(model="tiny", prompt="a red fox", size="64x64", extra_body=GUIDED)
        alone = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny", device="cpu"))
        (reference,) = alone.generate([OmniDiffusionRequest("a red fox", 64, 64, **GUIDED)])
        assert_pixels_close(decode(answer.data[0].b64_json), reference.images[0])
        # The leader times its pipeline call by stage, as a single rank does.
        for stage in ("text_encode", "denoise", "vae_decode"):
            assert server.metric("imagegen_request_stage_time_seconds_count", stage=stage) == 1, stage

        pids = {rank_of(pid): pid for pid in server.worker_pids()}
        assert sorted(pids) == [0, 1]
        with ThreadPoolExecutor(1) as pool:
            running_before = server.metric("imagegen_num_requests_running")
            inflight = pool.submit(server.post, size="128x128", num_inference_steps=150, guidance_scale=6.0)
            poll(lambda: server.metric("imagegen_num_requests_running") > running_before, 30, "the request to run")
            os.kill(pids[1], signal.SIGKILL)  # the non-leader: its leader waits for it in a collective
            response = inflight.result(timeout=60)
        assert response.status_code == 503
        assert "rank 1" in response.json()["error"]["message"]
        # The survivor goes too, and the pair forms again with fresh processes.
        poll(lambda: not pid_alive(pids[0]), 30, "the survivor of the pair to be stopped")
        poll(lambda: httpx.get(f"{server.base_url}/ready").status_code == 200, 120, "/ready after the restart")
        replaced = {rank_of(pid): pid for pid in server.worker_pids()}
        assert sorted(replaced) == [0, 1] and not set(replaced.values()) & set(pids.values())
        assert server.metric("imagegen_worker_restarts_total") == 2
        assert server.metric("imagegen_worker_up", rank="1") == 1
        again = client.images.generate(model="tiny", prompt="a red fox", size="64x64", extra_body=GUIDED)
        assert_pixels_close(decode(again.data[0].b64_json), reference.images[0])
    finally:
        server.stop()
