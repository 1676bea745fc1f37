"""Backend "ray" when one of its actors dies: the engine's on_worker_death policy applies, as with mp."""

from __future__ import annotations

import pytest
import ray
from helpers import local_ray, poll

from engine import DiffusionEngine, EngineDeadError, OmniDiffusionConfig, OmniDiffusionRequest

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    with local_ray(num_cpus=4):
        yield


def ray_engine(policy: str) -> DiffusionEngine:
    return DiffusionEngine(
        OmniDiffusionConfig(model="tiny", distributed_executor_backend="ray", on_worker_death=policy)
    )


def healthy(engine: DiffusionEngine) -> bool:
    try:
        engine.check_health()
    except EngineDeadError:
        return False
    return True


def one_request(seed: int = 1) -> list[OmniDiffusionRequest]:
    return [OmniDiffusionRequest("a red fox", num_inference_steps=2, seed=seed)]


def test_killed_actor_fails_the_step_then_is_replaced_in_its_bundle():
    with ray_engine("restart") as engine:
        (before,) = engine.step(one_request())
        old = engine.executor.worker_handles[0]
        ray.kill(old)
        with pytest.raises(EngineDeadError, match=r"worker rank 0 .* is dead"):
            engine.step(one_request())
        poll(engine.is_ready, 120, "the engine to replace the actor")
        new = engine.executor.worker_handles[0]
        assert new != old
        assert ray.get(new.get_rank.remote(), timeout=30) == 0
        (after,) = engine.step(one_request())
        engine.check_health()
    assert after.error is None and after.images[0].tobytes() == before.images[0].tobytes()
    # The replacement ran in the same placement group: closing the engine gave back every CPU.
    poll(lambda: ray.available_resources().get("CPU") == 4, 30, "the CPUs to return")


def test_killed_actor_under_exit_policy_makes_the_engine_fatal():
    with ray_engine("exit") as engine:
        ray.kill(engine.executor.worker_handles[0])
        # ray.kill is asynchronous: a health check sent at once may still reach the actor before the kill.
        poll(lambda: not healthy(engine), 30, "a health check to find the killed actor")
        with pytest.raises(EngineDeadError, match="rank 0"):
            engine.check_health()
        assert "rank 0" in engine.fatal_error
        with pytest.raises(EngineDeadError):
            engine.step(one_request())


def test_a_killed_actor_of_a_cfg_pair_brings_the_whole_pair_back_meeting_on_a_new_address():
    config = OmniDiffusionConfig(
        model="tiny", distributed_executor_backend="ray", num_gpus=2, cfg_parallel_size=2, on_worker_death="restart"
    )
    guided = [OmniDiffusionRequest("a red fox", num_inference_steps=3, guidance_scale=6.0, seed=2)]
    with DiffusionEngine(config) as engine:
        (before,) = engine.step(guided)
        assert before.error is None and before.rank == 0
        olds = list(engine.executor.worker_handles)
        ray.kill(olds[1])
        with pytest.raises(EngineDeadError, match="rank"):
            engine.step(guided)
        poll(engine.is_ready, 120, "the engine to replace the pair")
        assert not set(engine.executor.worker_handles) & set(olds)  # both ranks, not only the killed one
        (after,) = engine.step(guided)
    assert after.error is None and after.images[0].tobytes() == before.images[0].tobytes()
