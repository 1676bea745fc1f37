"""Several models behind one server (docs/models.md): each loads on its first request, the least recently
used idle one makes room (--max-loaded-models, --memory-budget-gib), an idle one unloads (keep-alive), a busy
one is never unloaded, and one that cannot load fails alone. Real servers, real mp workers, the official SDK."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from helpers import (
    ADMIN_KEY,
    ENDLESS_STREAM,
    ServerProcess,
    assert_pixels_close,
    decode,
    metric_samples,
    pid_alive,
    poll,
    start_workers,
)

pytestmark = pytest.mark.slow

MODELS = ("demo", "tiny", "tiny-flux")
REQUEST = {"prompt": "a red fox", "size": "64x64", "extra_body": {"num_inference_steps": 2, "seed": 7}}
# How long a request may wait for room in the LRU server before its 503.
ROOM_WAIT_S = 5


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def generate(server: ServerProcess, model: str):
    """The pixels ``model`` makes for REQUEST on ``server``."""
    result = client_of(server).images.generate(model=model, **REQUEST)
    return decode(result.data[0].b64_json)


def statuses(server: ServerProcess) -> dict[str, str]:
    cards = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"]
    return {card["id"]: card["status"] for card in cards if card.get("parent") is None}


def loaded(server: ServerProcess) -> set[str]:
    return {name for name, status in statuses(server).items() if status == "loaded"}


def unloads(server: ServerProcess, model: str, reason: str) -> float:
    return server.metric("imagegen_model_unloads_total", model_name=model, reason=reason)


@pytest.fixture(scope="module")
def lru_server():
    """demo, tiny and tiny-flux with room for two, requests allowed to run until their client hangs up."""
    server = ServerProcess(
        "--model", *MODELS, "--max-loaded-models", "2", "--max-num-inference-steps", "100000",
        "--request-timeout-s", str(ROOM_WAIT_S),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_pixels():
    """Each model's pixels for REQUEST from a server of its own (the three started at once)."""
    servers: dict[str, ServerProcess] = {}
    starts = [threading.Thread(target=lambda m=m: servers.__setitem__(m, ServerProcess("--model", m))) for m in MODELS]
    for start in starts:
        start.start()
    for start in starts:
        start.join()
    try:
        return {model: generate(server, model) for model, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def test_each_model_answers_with_the_pixels_of_its_own_server_within_1_of_255(lru_server, own_pixels):
    for model in MODELS:
        assert_pixels_close(generate(lru_server, model), own_pixels[model])
        assert model in loaded(lru_server)
    samples = metric_samples(lru_server.metrics(), "imagegen_requests_total")
    named = {s.labels["model_name"] for s in samples if s.labels["endpoint"] == "/v1/images/generations"}
    assert set(MODELS) <= named  # each request counted for the model it named


def test_the_third_load_unloads_the_least_recently_used_and_a_request_loads_it_again(lru_server):
    generate(lru_server, "demo")
    generate(lru_server, "tiny")
    assert loaded(lru_server) == {"demo", "tiny"}
    before = unloads(lru_server, "demo", "room")
    generate(lru_server, "tiny-flux")
    assert loaded(lru_server) == {"tiny", "tiny-flux"}
    assert unloads(lru_server, "demo", "room") == before + 1
    assert lru_server.metric("imagegen_model_loaded", model_name="demo") == 0
    generate(lru_server, "demo")  # loads it again; tiny is now the least recently used
    assert loaded(lru_server) == {"tiny-flux", "demo"}


def endless(server: ServerProcess, model: str) -> tuple[httpx.Client, httpx.Response, Iterator[str]]:
    """A request on ``model`` that runs until the returned response is closed, with its lines still to come;
    returned once it denoises (a model that must load first sends loading_model progress events before). Keep
    the lines: dropped, their iterator closes the response, which ends the request."""
    client = httpx.Client(timeout=300)
    url = f"{server.base_url}/v1/images/generations"
    response = client.send(client.build_request("POST", url, json={**ENDLESS_STREAM, "model": model}), stream=True)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data:") and json.loads(line.removeprefix("data:")).get("stage") == "denoising":
            break
    return client, response, lines


def test_room_is_never_taken_from_a_busy_model(lru_server):
    client, running, events = endless(lru_server, "demo")
    try:
        generate(lru_server, "tiny")  # loaded beside the busy demo, whatever held the other place
        assert loaded(lru_server) == {"demo", "tiny"}
        generate(lru_server, "tiny-flux")  # demo is the least recently used, but busy: tiny goes
        assert loaded(lru_server) == {"demo", "tiny-flux"}
        assert any(line.startswith("event: image_generation.progress") for line in events)  # demo still runs
    finally:
        running.close()
        client.close()


def test_with_every_loaded_model_busy_a_third_waits_then_gets_503_naming_them(lru_server):
    # Each stream's line iterator is kept: dropped, it would close its response, and so end its request.
    demo_client, demo, demo_events = endless(lru_server, "demo")
    tiny_client, tiny, tiny_events = endless(lru_server, "tiny")
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            client_of(lru_server).images.generate(model="tiny-flux", **REQUEST)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"]
        message = refused.value.response.json()["error"]["message"]
        assert "'demo'" in message and "'tiny'" in message and "tiny-flux" in message
    finally:
        for response, client in ((demo, demo_client), (tiny, tiny_client)):
            response.close()
            client.close()


@pytest.fixture(scope="module")
def sizes():
    """Bytes each model takes on the CPU, from its modules built on the meta device (the figure the server
    uses before a model's first load); the test below checks them against what its workers measure."""
    from workers.config import OmniDiffusionConfig
    from workers.models.catalog import resolve_model_path
    from workers.runtime.memory import estimate_model_bytes

    found = {}
    for model in MODELS:
        config = OmniDiffusionConfig(model=model, device="cpu")
        resolve_model_path(model, config.model_cache_dir)  # a built-in model is built on first use
        found[model] = estimate_model_bytes(config)
    return found


@pytest.fixture(scope="module")
def budget_server(sizes):
    # Between the sizes: demo fits beside tiny-flux but not beside tiny; tiny and tiny-flux fit together.
    budget = (sizes["demo"] + sizes["tiny-flux"] + sizes["demo"] + sizes["tiny"]) / 2
    assert sizes["demo"] + sizes["tiny-flux"] <= budget < sizes["demo"] + sizes["tiny"]
    server = ServerProcess("--model", *MODELS, "--memory-budget-gib", repr(budget / 1024**3))
    server.budget_bytes = budget
    yield server
    server.stop()


def test_the_memory_budget_fits_as_many_models_as_it_allows_never_more(budget_server, sizes):
    def check(expected: set[str]) -> None:
        cards = httpx.get(f"{budget_server.base_url}/v1/models", timeout=30).json()["data"]
        held = {card["id"]: card["memory_bytes"]["cpu"] for card in cards if card["status"] == "loaded"}
        assert set(held) == expected
        assert sum(held.values()) <= budget_server.budget_bytes
        for name, size in held.items():
            assert size == sizes[name]  # what the workers measured is what the meta-device build estimated
            assert budget_server.metric("imagegen_model_memory_bytes", model_name=name, device="cpu") == size

    generate(budget_server, "demo")
    generate(budget_server, "tiny-flux")
    check({"demo", "tiny-flux"})
    generate(budget_server, "tiny")  # demo (least recently used) goes; tiny-flux stays: the two fit
    check({"tiny-flux", "tiny"})
    # tiny-flux is the least recently used, but tiny must go anyway: tiny-flux fits beside demo and stays.
    generate(budget_server, "demo")
    check({"tiny-flux", "demo"})


@pytest.fixture(scope="module")
def file_server(tmp_path_factory):
    """A models file: demo (preloaded), tiny-flux as 'flux-idle' unloaded after 2 s idle, a model that
    cannot load, tiny (for the admin routes, with their key), and tiny-flux on an `imagegen worker` of
    its own as 'remote' (backend grpc, beside the mp entries)."""
    (worker,) = start_workers(1, "--model", "tiny-flux", "--served-model-name", "remote")
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text(
        "- model: demo\n"
        "- model: tiny-flux\n  served_model_name: flux-idle\n  keep_alive_s: 2\n"
        "- model: /nonexistent/model-folder\n  served_model_name: broken\n"
        "- model: tiny\n"
        f"- model: tiny-flux\n  served_model_name: remote\n  distributed_executor_backend: grpc\n"
        f"  worker_addresses: ['{worker.address}']\n"
    )
    try:
        server = ServerProcess("--models-file", str(path), env={"IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY})
        yield server
        server.stop()
    finally:
        worker.stop()


def test_a_grpc_model_beside_mp_models_is_external_resident_and_cannot_be_unloaded(file_server):
    card = httpx.get(f"{file_server.base_url}/v1/models/remote", timeout=30).json()
    assert card["external"] is True and card["status"] == "loaded"
    assert generate(file_server, "remote").shape == (64, 64, 3)
    assert generate(file_server, "demo").shape == (64, 64, 3)
    refused = httpx.post(
        f"{file_server.base_url}/v1/models/remote/unload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    assert refused.status_code == 400 and "does not start" in refused.json()["error"]["message"]
    assert statuses(file_server)["remote"] == "loaded"


def test_an_idle_model_unloads_after_its_keep_alive_and_its_workers_exit(file_server):
    demo_workers = set(file_server.worker_pids())
    generate(file_server, "flux-idle")
    flux_workers = set(file_server.worker_pids()) - demo_workers
    assert flux_workers
    poll(lambda: statuses(file_server)["flux-idle"] == "unloaded", 60, "flux-idle to unload when idle")
    poll(lambda: not any(pid_alive(pid) for pid in flux_workers), 30, "its workers to exit")
    assert unloads(file_server, "flux-idle", "idle") >= 1
    assert statuses(file_server)["demo"] == "loaded"  # keep-alive -1: never


def test_a_model_that_cannot_load_answers_503_with_the_cause_while_the_others_serve(file_server):
    with pytest.raises(openai.InternalServerError) as failed:
        client_of(file_server).images.generate(model="broken", **REQUEST)
    assert failed.value.status_code == 503
    assert "/nonexistent/model-folder" in failed.value.response.json()["error"]["message"]
    assert generate(file_server, "demo").shape == (64, 64, 3)
    card = httpx.get(f"{file_server.base_url}/v1/models/broken", timeout=30).json()
    assert card["status"] == "failed" and "/nonexistent/model-folder" in card["status_error"]
    health = httpx.get(f"{file_server.base_url}/health", timeout=30)
    assert health.status_code == 200 and [f["model"] for f in health.json()["failed_models"]] == ["broken"]
    assert httpx.get(f"{file_server.base_url}/ready", timeout=30).status_code == 200


def test_admin_routes_load_and_unload_a_model_with_the_admin_key_only(file_server):
    url = f"{file_server.base_url}/v1/models/tiny"
    assert httpx.post(f"{url}/load", timeout=30).status_code == 401
    assert httpx.post(f"{url}/load", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    loaded_card = httpx.post(f"{url}/load", headers=admin, timeout=300)
    assert loaded_card.status_code == 200 and loaded_card.json()["status"] == "loaded"
    before = unloads(file_server, "tiny", "admin")
    unloaded = httpx.post(f"{url}/unload", headers=admin, timeout=300)
    assert unloaded.status_code == 200 and unloaded.json()["id"] == "tiny"
    assert statuses(file_server)["tiny"] == "unloaded"
    assert unloads(file_server, "tiny", "admin") == before + 1
    missing = httpx.post(f"{file_server.base_url}/v1/models/nope/load", headers=admin, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_requests_for_two_loaded_models_run_side_by_side(lru_server):
    client, running, events = endless(lru_server, "demo")  # events kept: dropped, it would end the request
    try:
        done = []
        thread = threading.Thread(target=lambda: done.append(generate(lru_server, "tiny")))
        thread.start()
        thread.join(300)
        assert done, "tiny's request waited for demo's endless one"
    finally:
        running.close()
        client.close()


def openmp_wait_policy(pid: int) -> str | None:
    """OMP_WAIT_POLICY in the environment process ``pid`` started with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in entries if entry).get("OMP_WAIT_POLICY")


def test_the_workers_of_several_models_wait_passively_and_one_models_as_before(lru_server, tiny_server):
    generate(lru_server, "tiny")  # loaded: its workers run
    assert lru_server.worker_pids()
    assert {openmp_wait_policy(pid) for pid in lru_server.worker_pids()} == {"PASSIVE"}
    assert tiny_server.worker_pids()
    assert {openmp_wait_policy(pid) for pid in tiny_server.worker_pids()} == {None}


def admin_post(server: ServerProcess, path: str, **body) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}{path}", json=body or None, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=300
    )


@pytest.fixture(scope="module")
def lora_server(model_cache, tmp_path_factory):
    """tiny (preloaded) and tiny-flux, with run-time LoRA adapters from a folder holding one for tiny."""
    from lora_adapters import make_lora

    folder = tmp_path_factory.mktemp("loras")
    make_lora(folder / "sharp", model_cache, seed=1)
    server = ServerProcess(
        "--model", "tiny", "tiny-flux", "--allow-runtime-lora", "--lora-dir", str(folder),
        env={"IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY},
    )
    server.lora_path = str(folder / "sharp")
    yield server
    server.stop()


def test_a_run_time_lora_adapter_comes_back_when_its_model_loads_again(lora_server):
    loaded_adapter = admin_post(
        lora_server, "/v1/load_lora_adapter", lora_name="sharp", lora_path=lora_server.lora_path, model="tiny"
    )
    assert loaded_adapter.status_code == 200, loaded_adapter.text
    with_adapter = generate(lora_server, "sharp")
    assert (with_adapter != generate(lora_server, "tiny")).any()  # the adapter changes the pixels

    assert admin_post(lora_server, "/v1/models/tiny/unload").status_code == 200
    assert statuses(lora_server)["tiny"] == "unloaded"
    cards = httpx.get(f"{lora_server.base_url}/v1/models", timeout=30).json()["data"]
    assert {"id": "sharp", "parent": "tiny"}.items() <= next(c for c in cards if c["id"] == "sharp").items()

    # A request naming the adapter loads its model again, adapter and all: the same computation, the same pixels.
    assert (generate(lora_server, "sharp") == with_adapter).all()
    assert statuses(lora_server)["tiny"] == "loaded"

    # An adapter unloaded while its model is not loaded stays out of its next load.
    assert admin_post(lora_server, "/v1/models/tiny/unload").status_code == 200
    assert admin_post(lora_server, "/v1/unload_lora_adapter", lora_name="sharp").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client_of(lora_server).images.generate(model="sharp", **REQUEST)
    generate(lora_server, "tiny")
    assert "sharp" not in {c["id"] for c in httpx.get(f"{lora_server.base_url}/v1/models", timeout=30).json()["data"]}


def test_a_streaming_request_sees_loading_progress_events_while_its_model_loads(lora_server):
    if statuses(lora_server)["tiny-flux"] != "unloaded":
        assert admin_post(lora_server, "/v1/models/tiny-flux/unload").status_code == 200
    body = {"prompt": "a red fox", "size": "64x64", "model": "tiny-flux", "num_inference_steps": 2, "stream": True,
            "progress": True}
    with httpx.stream("POST", f"{lora_server.base_url}/v1/images/generations", json=body, timeout=300) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    kinds = [(event["type"], event.get("stage"), event.get("step")) for event in events]
    loading = [kind for kind in kinds if kind[1] == "loading_model"]
    assert loading and kinds[: len(loading)] == loading  # first, before any step
    assert set(loading) == {("image_generation.progress", "loading_model", 0)}
    assert [kind for kind in kinds if kind[1] == "denoising"] == [
        ("image_generation.progress", "denoising", 1), ("image_generation.progress", "denoising", 2)
    ]
    assert kinds[-1][0] == "image_generation.completed"
    assert decode(events[-1]["b64_json"]).shape == (64, 64, 3)
    assert statuses(lora_server)["tiny-flux"] == "loaded"
