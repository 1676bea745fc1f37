"""A rank group that fails is set aside, not the server: two rank groups of real `imagegen worker`
processes (backend grpc, 127.0.0.1), one of them stalled (SIGSTOP), hung (a pipeline call that does not
return while the worker's gRPC threads answer) or killed. The other group serves every later request,
/ready stays 200, and the probe re-admits the group once it answers again."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import openai
import pytest
from helpers import ADMIN_KEY, TESTS, ServerProcess, WorkerProcess, admin, poll, scheduling_by_default
from lora_adapters import make_lora

from workers.models.catalog import resolve_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def request_mode():
    """The hang hook (tests/hanging_worker.py) blocks request mode's pipeline call, and request mode shards a
    step across both groups."""
    with scheduling_by_default("request"):
        yield

# Short, so a hung call fails fast; the workers use the same value to report NOT_SERVING.
RPC_TIMEOUT_S = 3
PROBE_INTERVAL_S = 1.0
IMAGE = {"prompt": "a red fox", "size": "64x64", "extra_body": {"num_inference_steps": 2}}


def worker_flags() -> tuple[str, ...]:
    return ("--num-gpus", "2", "--model", "tiny", "--rpc-timeout-s", str(RPC_TIMEOUT_S))


class HangableWorker(WorkerProcess):
    """A worker whose pipeline calls hang between ``hang()`` and ``unhang()`` (tests/hanging_worker.py: they
    block on reading ``hang_fifo`` while this test holds its write end)."""

    def __init__(self, rank: int, hang_fifo: Path, port: int | None = None, wait: bool = True):
        self.hang_fifo = hang_fifo
        self._writer: int | None = None
        super().__init__(
            rank, *worker_flags(), port=port, wait=wait, env={"IMAGEGEN_TEST_HANG_FIFO": str(hang_fifo)},
            program=(str(TESTS / "hanging_worker.py"),),
        )

    def hang(self) -> None:
        os.mkfifo(self.hang_fifo)
        self._writer = os.open(self.hang_fifo, os.O_RDWR)  # never blocks; a reader's open returns at once

    def unhang(self) -> None:
        """Idempotent. Unlinked first, so no call opens the FIFO after its last writer closed."""
        if self._writer is not None:
            self.hang_fifo.unlink()
            os.close(self._writer)  # the blocked reads return: the hung calls go on
            self._writer = None


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hang")
    group = [HangableWorker(rank, folder / f"rank-{rank}", wait=False) for rank in range(2)]
    for worker in group:
        worker.wait_serving()
    yield group
    for worker in group:
        worker.unhang()
        worker.stop()


@pytest.fixture
def workers(started):
    """Both ranks serving at the start of each test: one a test stopped or killed is brought back."""
    for index, worker in enumerate(started):
        worker.unhang()
        if worker.process.poll() is not None:
            started[index] = HangableWorker(worker.rank, worker.hang_fifo, port=worker.port)
        else:
            os.kill(worker.process.pid, signal.SIGCONT)
            worker.wait_serving()
    return started


@pytest.fixture
def server(workers):
    addresses = ",".join(worker.address for worker in workers)
    server = ServerProcess(
        "--backend", "grpc", "--worker-addresses", addresses, "--num-gpus", "2",
        "--rpc-timeout-s", str(RPC_TIMEOUT_S), "--health-check-interval-s", str(PROBE_INTERVAL_S),
        "--allow-runtime-lora", env={"IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY},
    )
    yield server
    server.stop()


def groups(server: ServerProcess, state: str) -> float:
    return server.metric("imagegen_rank_groups", state=state)


def status(server: ServerProcess, probe: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}/{probe}", timeout=30)


def serve_in_turn(server: ServerProcess, count: int) -> list[int | str]:
    """``count`` single requests, one after the other: 200, or the failed request's status and message."""
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    answers = []
    for _ in range(count):
        try:
            answers.append(len(client.images.generate(**IMAGE).data) and 200)
        except openai.APIStatusError as error:
            answers.append(f"{error.status_code} {error.message}")
    return answers


def assert_only_the_first_fails_naming_rank_1(answers: list[int | str]) -> None:
    failures = [answer for answer in answers if answer != 200]
    assert failures == answers[: len(failures)] and len(failures) <= 1, answers
    assert all(("503" in failure or "504" in failure) and "rank 1" in failure for failure in failures), failures


def assert_readmitted(server: ServerProcess) -> None:
    poll(lambda: groups(server, "serving") == 2, 30, "the group to be re-admitted")
    assert groups(server, "set_aside") == 0
    assert status(server, "health").json()["set_aside"] == []
    # Two images of one request: one from each group.
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert len(client.images.generate(n=2, **IMAGE).data) == 2


def test_a_stalled_worker_is_set_aside_and_readmitted_after_sigcont(server, workers):
    stalled = workers[1]
    os.kill(stalled.process.pid, signal.SIGSTOP)
    try:
        answers = serve_in_turn(server, 4)
        assert_only_the_first_fails_naming_rank_1(answers)
        assert status(server, "ready").status_code == 200
        health = status(server, "health")
        assert health.status_code == 200 and [entry["rank"] for entry in health.json()["set_aside"]] == [1]
        assert groups(server, "set_aside") == 1 and groups(server, "serving") == 1
    finally:
        os.kill(stalled.process.pid, signal.SIGCONT)
    assert_readmitted(server)


def test_a_hung_pipeline_with_live_grpc_threads_is_set_aside_and_readmitted(server, workers):
    hung = workers[1]
    hung.hang()
    try:
        answers = serve_in_turn(server, 4)
        assert_only_the_first_fails_naming_rank_1(answers)
        assert status(server, "ready").status_code == 200
        # Its gRPC threads live: it says itself that a call ran past rpc_timeout_s, so the probe keeps it aside.
        poll(lambda: hung.health() == "NOT_SERVING", 5, "the hung worker to report NOT_SERVING")
        assert groups(server, "set_aside") == 1, server.output()[-4000:]
    finally:
        hung.unhang()
    assert_readmitted(server)


def test_probes_turn_the_metric_and_ready_within_three_intervals_of_a_death_with_no_request(server, workers):
    assert groups(server, "serving") == 2
    workers[1].kill()
    poll(lambda: groups(server, "set_aside") == 1, 3 * PROBE_INTERVAL_S, "the probe to set rank 1's group aside")
    assert status(server, "ready").status_code == 200
    workers[0].kill()
    poll(lambda: status(server, "ready").status_code == 503, 3 * PROBE_INTERVAL_S, "/ready to turn 503")
    health = status(server, "health")
    assert health.status_code == 503 and health.headers["Retry-After"]
    assert "rank 0" in health.json()["error"]["message"] and "rank 1" in health.json()["error"]["message"]
    # Their owner starts them again on the same addresses: the probes bring both groups back.
    for index, worker in enumerate(workers):
        workers[index] = HangableWorker(worker.rank, worker.hang_fifo, port=worker.port, wait=False)
    for worker in workers:
        worker.wait_serving()
    assert_readmitted(server)
    assert status(server, "ready").status_code == 200


def test_an_adapter_loaded_while_a_group_is_aside_is_replayed_on_it_before_it_serves(
    server, workers, model_cache, tmp_path
):
    adapter = make_lora(tmp_path / "fresh", model_cache, seed=2)
    hung = workers[1]
    hung.hang()
    try:
        assert_only_the_first_fails_naming_rank_1(serve_in_turn(server, 2))
        # Only the serving group takes the load: the hung one would hold it until rpc_timeout_s.
        loaded = admin(server, "load_lora_adapter", lora_name="fresh", lora_path=str(adapter))
        assert loaded.status_code == 200, loaded.text
    finally:
        hung.unhang()
    poll(lambda: groups(server, "serving") == 2, 30, "the group to be re-admitted")
    # Two images, one from each group: rank 1 got the adapter when it was initialized again.
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert len(client.images.generate(model="fresh", n=2, **IMAGE).data) == 2


def test_an_mp_group_whose_restart_fails_is_set_aside_and_restarted_by_the_probe(model_cache, tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(resolve_model_path("tiny", model_cache), folder)
    index = folder / "model_index.json"
    good = index.read_text()
    server = ServerProcess("--model", str(folder), "--num-gpus", "2", "--health-check-interval-s", str(PROBE_INTERVAL_S))
    try:
        index.write_text("{not json")  # every load from now on fails
        rank_1 = server.worker_pids()[1]
        os.kill(rank_1, signal.SIGKILL)
        poll(lambda: groups(server, "set_aside") == 1, 120, "the failed restart to set the group aside")
        health = status(server, "health")
        assert health.status_code == 200 and "could not be restarted" in health.json()["set_aside"][0]["reason"]
        assert status(server, "ready").status_code == 200
        assert serve_in_turn(server, 2) == [200, 200]  # the other group serves; the engine is not fatal
        index.write_text(good)
        poll(lambda: groups(server, "serving") == 2, 120, "the probe to restart the group")
        assert rank_1 not in server.worker_pids() and len(server.worker_pids()) == 2
    finally:
        server.stop()
