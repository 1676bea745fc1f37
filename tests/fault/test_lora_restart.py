"""A rank that starts again (a restarted mp worker, a replaced Ray actor, a gRPC worker started again
on its address) gets the start-up and the run-time LoRA adapters before it serves."""

from __future__ import annotations

import os
import signal

import httpx
import numpy as np
import openai
import pytest
from helpers import ADMIN_KEY, ServerProcess, WorkerProcess, admin, decode, local_ray, poll, start_workers
from lora_adapters import make_lora

from engine import DiffusionEngine, EngineDeadError, LoraWeight, OmniDiffusionConfig, OmniDiffusionRequest
from workers.config import LoraModule

pytestmark = pytest.mark.slow

MODELS = ("tiny", "sharp", "fresh")


@pytest.fixture(scope="module")
def adapters(model_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return make_lora(root / "sharp", model_cache, seed=1), make_lora(root / "fresh", model_cache, seed=2)


def _images(server: ServerProcess) -> dict[str, np.ndarray]:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    return {
        model: decode(
            client.images.generate(
                model=model, prompt="a red fox", size="64x64", extra_body={"seed": 3, "num_inference_steps": 3}
            ).data[0].b64_json
        )
        for model in MODELS
    }


def _load_fresh(server: ServerProcess, path) -> None:
    response = admin(server, "load_lora_adapter", lora_name="fresh", lora_path=str(path))
    assert response.status_code == 200, response.text


def _assert_same(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    # Each adapter still changes the pixels, and each request replays bit for bit (the same computation).
    assert np.abs(before["sharp"] - before["tiny"]).max() > 8 and np.abs(before["fresh"] - before["tiny"]).max() > 8
    for model in MODELS:
        assert np.array_equal(after[model], before[model]), model


def test_a_restarted_mp_worker_reloads_its_adapters(adapters):
    sharp, fresh = adapters
    server = ServerProcess(
        "--model", "tiny", "--lora-modules", f"sharp={sharp}", "--allow-runtime-lora",
        env={"IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY},
    )
    try:
        _load_fresh(server, fresh)
        before = _images(server)
        (worker,) = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        poll(lambda: server.metric("imagegen_worker_restarts_total") == 1, 120, "the worker's restart")
        poll(lambda: httpx.get(f"{server.base_url}/ready").status_code == 200, 60, "/ready after the restart")
        assert server.worker_pids() != [worker]
        _assert_same(before, _images(server))
    finally:
        server.stop()


def test_a_grpc_worker_started_again_gets_the_servers_adapters(adapters):
    sharp, fresh = adapters
    # The worker confines paths to its own --lora-dir: the adapters' folder, on its host.
    flags = ("--model", "tiny", "--lora-dir", str(sharp.parent))
    (worker,) = start_workers(1, *flags)
    server = None
    try:
        server = ServerProcess(
            "--model", "tiny", "--backend", "grpc", "--worker-addresses", worker.address,
            "--lora-modules", f"sharp={sharp}", "--allow-runtime-lora", env={"IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY},
        )
        _load_fresh(server, "fresh")  # relative: taken from the worker's --lora-dir
        before = _images(server)
        outside = admin(server, "load_lora_adapter", lora_name="elsewhere", lora_path="/etc")
        assert outside.status_code == 400 and "outside --lora-dir" in outside.json()["error"]["message"]
        worker.kill()
        # /health checks the workers: it notices the loss.
        poll(lambda: httpx.get(f"{server.base_url}/health", timeout=30).status_code == 503, 60, "the worker's loss")
        # Its orchestrator starts it again, knowing nothing of the adapters: the server loads them.
        worker = WorkerProcess(0, "--num-gpus", "1", *flags, port=worker.port)
        poll(lambda: httpx.get(f"{server.base_url}/ready", timeout=30).status_code == 200, 120, "the reconnect")
        _assert_same(before, _images(server))
    finally:
        if server is not None:
            server.stop()
        worker.stop()


def test_a_replaced_ray_actor_reloads_its_adapters(adapters):
    import ray

    sharp, fresh = adapters
    config = OmniDiffusionConfig(model="tiny", distributed_executor_backend="ray", lora_modules=[f"sharp={sharp}"])
    requests = [
        OmniDiffusionRequest("a red fox", height=64, width=64, num_inference_steps=3, seed=3,
                             loras=(LoraWeight(name),) if name else ())
        for name in (None, "sharp", "fresh")
    ]
    with local_ray(num_cpus=2), DiffusionEngine(config) as engine:
        engine.loras.load(LoraModule("fresh", str(fresh)))
        before = [output.images[0].tobytes() for output in engine.step(requests)]
        ray.kill(engine.executor.worker_handles[0])
        with pytest.raises(EngineDeadError):
            engine.step(requests)
        poll(engine.is_ready, 120, "the engine to replace the actor")
        assert engine.collective_rpc("describe")[0]["lora_adapters"] == ["fresh", "sharp"]
        after = [output.images[0].tobytes() for output in engine.step(requests)]
    assert len(set(before)) == 3 and after == before


def test_a_named_ray_actor_started_again_gets_the_engines_adapters(adapters):
    import ray

    from workers.hosts.ray_actor import RayDiffusionWorkerActor

    sharp, fresh = adapters

    def start_actor():
        # Its owner knows nothing of the adapters; the engine initializes it and loads them.
        return RayDiffusionWorkerActor.options(num_gpus=0, num_cpus=1, name="lora_rank_0").remote(
            rank=0, od_config=OmniDiffusionConfig(model="tiny")
        )

    def reconnected() -> bool:
        try:
            engine.check_health()  # finds the new actor of that name
        except EngineDeadError:
            return False
        return engine.is_ready()

    config = OmniDiffusionConfig(
        model="tiny", distributed_executor_backend="ray_external", worker_actor_names=["lora_rank_0"],
        lora_modules=[f"sharp={sharp}"],
    )
    requests = [
        OmniDiffusionRequest("a red fox", height=64, width=64, num_inference_steps=3, seed=3,
                             loras=(LoraWeight(name),) if name else ())
        for name in (None, "sharp", "fresh")
    ]
    with local_ray(num_cpus=2):
        actor = start_actor()
        try:
            with DiffusionEngine(config) as engine:
                engine.loras.load(LoraModule("fresh", str(fresh)))
                before = [output.images[0].tobytes() for output in engine.step(requests)]
                ray.kill(actor)
                with pytest.raises(EngineDeadError):
                    engine.step(requests)
                actor = start_actor()
                poll(reconnected, 120, "the engine to reconnect to the new actor")
                after = [output.images[0].tobytes() for output in engine.step(requests)]
        finally:
            ray.kill(actor)
    assert len(set(before)) == 3 and after == before
