"""Backends ray_external and ray on a real local Ray (one per module), the tiny model, CPU actors."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import openai
import pytest
import ray
from helpers import ServerProcess, assert_pixels_close, decode, free_port, local_ray, poll
from ray.exceptions import RayActorError

from engine import DiffusionEngine, EngineDeadError, OmniDiffusionConfig, OmniDiffusionRequest
from executors import RpcTimeoutError, WorkerRpcError, WorkerStartupError
from executors.ray import RayDiffusionExecutor
from executors.ray_external import RayDiffusionWorkerActor

pytestmark = pytest.mark.slow

NAMESPACE = "imagegen-tests"
NAMES = ["imagegen_rank_0", "imagegen_rank_1"]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 8 logical CPUs on a loopback address; yields its GCS address."""
    with local_ray(num_cpus=8, namespace=NAMESPACE) as address:
        yield address


def start_actors(names: list[str], config: OmniDiffusionConfig, first_rank: int = 0) -> list:
    """CPU actors: num_gpus=0 and one CPU each (one torch thread)."""
    return [
        RayDiffusionWorkerActor.options(num_gpus=0, num_cpus=1, name=name).remote(rank=rank, od_config=config)
        for rank, name in enumerate(names, start=first_rank)
    ]


def kill(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)


@pytest.fixture(scope="module")
def actors(ray_cluster):
    """Two initialized actors, named NAMES, that outlive every engine built on them."""
    handles = start_actors(NAMES, OmniDiffusionConfig(model="tiny", num_gpus=2))
    assert [reply["status"] for reply in ray.get([a.initialize.remote() for a in handles])] == ["ready", "ready"]
    yield handles
    kill(handles)


def engine_on(names: list[str], **settings) -> DiffusionEngine:
    return DiffusionEngine(
        OmniDiffusionConfig(
            model="tiny",
            num_gpus=len(names),
            distributed_executor_backend="ray_external",
            worker_actor_names=names,
            **settings,
        )
    )


def requests_for(seeds, **fields) -> list[OmniDiffusionRequest]:
    fields.setdefault("num_inference_steps", 4)
    return [OmniDiffusionRequest("a red fox", seed=seed, **fields) for seed in seeds]


def pixels(outputs) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for output in outputs for image in output.images]


def test_close_leaves_actors_alive_for_a_new_engine(actors):
    requests = requests_for([5, 6, 7])
    # Request mode shards one step's requests across both ranks, so the second engine shows it reached both.
    first = engine_on(NAMES, scheduling="request")
    before = first.step(requests)
    first.close()
    assert ray.get([actor.get_rank.remote() for actor in actors], timeout=30) == [0, 1]
    with pytest.raises(EngineDeadError):
        first.step(requests)
    with engine_on(NAMES, scheduling="request") as second:
        after = second.step(requests)
    assert {o.rank for o in after} == {0, 1}
    assert all(np.array_equal(a, b) for a, b in zip(pixels(before), pixels(after), strict=True))


def test_collective_rpc_replies_and_worker_errors_name_the_rank(actors):
    with engine_on(NAMES) as engine:
        assert engine.collective_rpc("get_rank") == [0, 1]
        assert engine.collective_rpc("get_rank", unique_reply_rank=1) == 1
        assert engine.collective_rpc("describe", unique_reply_rank=0)["native_size"] == "64x64"
        with pytest.raises(WorkerRpcError, match=r"worker rank [01]: AttributeError: .*no_such_method"):
            engine.collective_rpc("no_such_method")
        with pytest.raises(WorkerRpcError, match="not a public worker method"):
            engine.collective_rpc("_generate_group", args=([],))
        # The actors live on after the errors.
        assert engine.collective_rpc("get_rank") == [0, 1]


def test_rpc_timeout_names_method_ranks_and_timeout(actors):
    with engine_on(NAMES) as engine:
        big = [engine.prepare(r) for r in requests_for(range(8))]
        with pytest.raises(
            RpcTimeoutError, match=r"RPC 'generate' timed out after 0.01s waiting for rank 0, 1"
        ) as error:
            engine.collective_rpc("generate", timeout=0.01, args=(big,))
        assert error.value.ranks == (0, 1)
        # The late replies are dropped and the actors keep serving.
        assert engine.collective_rpc("get_rank") == [0, 1]
        engine.check_health()


def test_health_check_answers_while_a_rank_is_busy(actors):
    with engine_on(NAMES) as engine:
        long = [engine.prepare(r) for r in requests_for([1], num_inference_steps=10)]  # about a second
        busy = [actor.generate.remote(long) for actor in actors]
        # get_rank runs on the actor's health thread, so the check ends before the generation.
        engine.check_health()
        finished, _ = ray.wait(busy, num_returns=len(busy), timeout=0)
        assert finished == []
        ray.get(busy)


def test_cancel_stops_a_running_generation_at_the_next_step(actors):
    with engine_on(NAMES) as engine:
        # Minutes of denoising on this machine if it ran to the end.
        (long,) = requests_for([1], num_inference_steps=150, width=128, height=128)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            step = pool.submit(engine.step, [long])
            engine.cancel([long.request_id])
            (output,) = step.result(timeout=60)
        assert output.images == [] and "cancelled" in output.error


def test_missing_actor_error_names_it_the_namespace_and_the_actors_that_exist(actors):
    with pytest.raises(WorkerStartupError) as error:
        engine_on(["imagegen_rank_0", "no_such_worker"])
    message = str(error.value)
    assert f"Failed to find Ray actor 'no_such_worker' in namespace '{NAMESPACE}'" in message
    assert f"'imagegen_rank_1' (namespace '{NAMESPACE}')" in message
    with pytest.raises(WorkerStartupError, match="Failed to find Ray actor 'imagegen_rank_0' in namespace 'elsewhere'"):
        engine_on(NAMES, ray_namespace="elsewhere")
    with engine_on(NAMES, ray_namespace=NAMESPACE) as engine:
        assert engine.collective_rpc("get_rank") == [0, 1]


def test_actor_names_setting_wins_over_the_environment(actors, monkeypatch):
    monkeypatch.setenv("DIFFUSION_WORKER_ACTOR_NAMES", "stale_0,stale_1")
    with engine_on(NAMES) as engine:
        assert engine.collective_rpc("get_rank") == [0, 1]
    with pytest.raises(WorkerStartupError, match="Failed to find Ray actor 'stale_0'"):
        DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=2, distributed_executor_backend="ray_external"))
    monkeypatch.delenv("DIFFUSION_WORKER_ACTOR_NAMES")
    with pytest.raises(WorkerStartupError, match="DIFFUSION_WORKER_ACTOR_NAMES"):
        DiffusionEngine(OmniDiffusionConfig(model="tiny", distributed_executor_backend="ray_external"))


def test_actors_must_be_listed_in_rank_order_and_complete(actors):
    with pytest.raises(
        WorkerStartupError, match="is rank 1 but is listed at position 0: list the actors in rank order"
    ):
        engine_on(list(reversed(NAMES)))
    with pytest.raises(WorkerStartupError, match="configured for 2 ranks"):
        engine_on(NAMES[:1])
    # The rejected engines disconnected and left the actors as they were.
    assert ray.get([actor.get_rank.remote() for actor in actors], timeout=30) == [0, 1]


def test_initialization_failure_names_the_rank_and_the_cause(ray_cluster, tmp_path):
    missing = tmp_path / "no-such-model"
    (actor,) = start_actors(["broken_0"], OmniDiffusionConfig(model=str(missing)))
    try:
        reply = ray.get(actor.initialize.remote())
        assert reply["status"] == "error" and "no-such-model" in reply["error"] and reply["rank"] == 0
        with pytest.raises(WorkerStartupError, match=r"Worker rank 0 failed to initialize: .*no-such-model"):
            engine_on(["broken_0"])
    finally:
        kill([actor])


def test_same_seed_same_pixels_on_mp_ray_and_ray_external(actors):
    requests = requests_for(range(20, 24))
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=2)) as mp_engine:
        on_mp = mp_engine.step(requests)
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=2, distributed_executor_backend="ray")) as engine:
        assert isinstance(engine.executor, RayDiffusionExecutor)
        on_ray = engine.step(requests)
    with engine_on(NAMES) as engine:
        on_ray_external = engine.step(requests)
    for outputs in (on_ray, on_ray_external):
        assert [o.rank for o in outputs] == [o.rank for o in on_mp]
        # The same batches, but a worker's torch thread count differs by backend (and by machine).
        for a, b in zip(pixels(on_mp), pixels(outputs), strict=True):
            assert_pixels_close(a, b)


def test_ray_backend_reserves_a_bundle_per_rank_and_kills_its_actors_on_close(ray_cluster):
    free_cpus = ray.available_resources().get("CPU", 0)
    config = OmniDiffusionConfig(model="tiny", distributed_executor_backend="ray", ray_cpus_per_worker=2)
    engine = DiffusionEngine(config)
    handles = list(engine.executor.worker_handles)
    created = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
    assert [pg["bundles"] for pg in created] == [{0: {"CPU": 2.0}}]
    assert engine.model_info["device"] == "cpu"
    (output,) = engine.step(requests_for([3]))
    assert output.error is None and output.rank == 0
    engine.close()
    for handle in handles:
        with pytest.raises(RayActorError):
            ray.get(handle.get_rank.remote(), timeout=30)
    # At least as many as before: an actor of an earlier test may still have been giving its CPUs back then.
    poll(lambda: ray.available_resources().get("CPU", 0) >= free_cpus, 30, "the placement group's CPUs to return")
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]


def test_ray_backend_that_cannot_fit_fails_at_once(ray_cluster):
    config = OmniDiffusionConfig(model="tiny", num_gpus=2, distributed_executor_backend="ray", ray_cpus_per_worker=6)
    with pytest.raises(WorkerStartupError, match="cannot hold 2 worker"):
        DiffusionEngine(config)
    config = OmniDiffusionConfig(
        model="tiny", num_gpus=2, distributed_executor_backend="ray", ray_rank_resources=[{"CPU": 1}]
    )
    with pytest.raises(WorkerStartupError, match="ray_rank_resources has 1 entries but num_gpus is 2"):
        DiffusionEngine(config)


def set_aside(server: ServerProcess) -> list[int]:
    return [entry["rank"] for entry in httpx.get(f"{server.base_url}/health", timeout=30).json()["set_aside"]]


def test_serve_through_named_actors_and_set_one_aside_when_it_dies(ray_cluster):
    names = ["serve_rank_0", "serve_rank_1"]
    handles = start_actors(names, OmniDiffusionConfig(model="tiny", num_gpus=2))
    server = None
    try:
        ray.get([actor.initialize.remote() for actor in handles])
        server = ServerProcess(
            "--backend",
            "ray_external",
            "--worker-actor-names",
            ",".join(names),
            "--ray-address",
            ray_cluster,
            "--ray-namespace",
            NAMESPACE,
        )
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        response = client.images.generate(
            prompt="a red fox", size="64x64", n=2, extra_body={"seed": 11, "num_inference_steps": 4}
        )
        assert [decode(image.b64_json).shape for image in response.data] == [(64, 64, 3)] * 2

        ray.kill(handles[1])
        # The probe sets rank 1's group aside; rank 0's group serves on, so the server stays alive and ready.
        poll(lambda: set_aside(server) == [1], 60, "the probe to set rank 1 aside")
        served = client.images.generate(prompt="a red fox", size="64x64", extra_body={"seed": 1, "num_inference_steps": 4})
        assert len(served.data) == 1
        assert httpx.get(f"{server.base_url}/ready", timeout=30).status_code == 200

        # The actors' owner brings rank 1 back under the same name: the probe initializes it and re-admits it.
        handles[1:] = start_actors(names[1:], OmniDiffusionConfig(model="tiny", num_gpus=2), first_rank=1)
        poll(lambda: set_aside(server) == [], 60, "the re-admission")
        again = client.images.generate(
            prompt="a red fox", size="64x64", n=2, extra_body={"seed": 11, "num_inference_steps": 4}
        )
        assert [image.b64_json for image in again.data] == [image.b64_json for image in response.data]
    finally:
        if server is not None:
            server.stop()
        kill(handles)


def test_a_cfg_pair_of_named_actors_is_formed_by_their_owner_and_found_by_each_engine(ray_cluster):
    # The owner gives both actors the pair's shape and meeting place; the pair forms when they initialize.
    names = ["imagegen_pair_0", "imagegen_pair_1"]
    config = OmniDiffusionConfig(
        model="tiny", num_gpus=2, cfg_parallel_size=2, rank_group_address=f"127.0.0.1:{free_port()}"
    )
    pair = start_actors(names, config)
    try:
        assert [r["status"] for r in ray.get([a.initialize.remote() for a in pair], timeout=300)] == ["ready"] * 2
        guided = requests_for([4], guidance_scale=6.0)
        with engine_on(names, cfg_parallel_size=2) as first:
            (served,) = first.step(guided)
        with engine_on(names, cfg_parallel_size=2) as second:  # the group outlives the first engine
            (again,) = second.step(guided)
        assert served.error is None and served.rank == 0
        assert served.images[0].tobytes() == again.images[0].tobytes()
        with pytest.raises(WorkerStartupError, match="started with rank groups"):
            engine_on(names)
    finally:
        kill(pair)


def initialized(actor) -> bool:
    try:
        return ray.get(actor.is_initialized.remote(), timeout=60)
    except ray.exceptions.RayError:  # still restarting
        return False


def test_an_actor_that_ray_restarts_in_place_is_initialized_again_before_it_serves(ray_cluster):
    config = OmniDiffusionConfig(model="tiny", num_gpus=1)
    actor = RayDiffusionWorkerActor.options(num_gpus=0, num_cpus=1, name="restarting_rank_0", max_restarts=1).remote(
        rank=0, od_config=config
    )
    try:
        ray.get(actor.initialize.remote())
        with engine_on(["restarting_rank_0"], health_check_interval_s=1) as engine:
            (before,) = engine.step(requests_for([5]))
            ray.kill(actor, no_restart=False)  # Ray starts it again in place: same actor, no model
            try:
                (during,) = engine.step(requests_for([5]))
            except EngineDeadError as error:  # the call that was on the dead actor
                assert "rank 0" in str(error)
            else:  # the probe had already brought it back
                assert during.error is None
            # get_rank answers at once on the restarted actor; the probe asks whether it is initialized, and
            # initializes it before routing to it.
            poll(lambda: initialized(actor), 60, "the probe to initialize it")
            poll(lambda: engine.rank_groups.serving() == [0], 30, "the re-admission")
            (after,) = engine.step(requests_for([5]))
        assert after.error is None and after.images[0].tobytes() == before.images[0].tobytes()
    finally:
        ray.kill(actor)
