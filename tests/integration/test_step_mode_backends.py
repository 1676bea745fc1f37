"""--scheduling step over every transport: backends ray (actors the engine launches), ray_external (named
actors a test starts), grpc (real `imagegen worker` processes) and data parallel on mp. Each runs the
worker's own running set; requests are sent as they arrive and answered as they finish."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import numpy as np
import pytest
import ray
from helpers import assert_pixels_close, local_ray, start_workers
from prometheus_client import REGISTRY

from engine import AsyncDiffusionEngine, DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest
from executors.ray_external import RayDiffusionWorkerActor
from workers.data import StepProgress

pytestmark = pytest.mark.slow

NAMESPACE = "imagegen-step-tests"


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=4, namespace=NAMESPACE) as address:
        yield address


@pytest.fixture(scope="module")
def request_engine(model_cache):
    with DiffusionEngine(OmniDiffusionConfig(model="tiny")) as engine:
        yield engine


@contextlib.contextmanager
def step_engine_on(backend: str, request):
    """A step-mode engine on ``backend``, with the workers it needs started (and stopped) here."""
    settings = {"model": "tiny", "scheduling": "step", "max_batch_size": 4}
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
        with DiffusionEngine(OmniDiffusionConfig(distributed_executor_backend="ray", **settings)) as engine:
            yield engine
    elif backend == "ray_external":
        request.getfixturevalue("ray_cluster")
        actor = RayDiffusionWorkerActor.options(num_gpus=0, num_cpus=1, name="imagegen_step_rank_0").remote(
            rank=0, od_config=OmniDiffusionConfig(**settings)
        )
        try:
            assert ray.get(actor.initialize.remote())["status"] == "ready"
            config = OmniDiffusionConfig(
                distributed_executor_backend="ray_external", worker_actor_names=["imagegen_step_rank_0"], **settings
            )
            with DiffusionEngine(config) as engine:
                yield engine
        finally:
            ray.kill(actor)
    else:
        workers = start_workers(1, "--model", "tiny", "--scheduling", "step", "--max-batch-size", "4")
        try:
            config = OmniDiffusionConfig(
                distributed_executor_backend="grpc", worker_addresses=[workers[0].address], **settings
            )
            with DiffusionEngine(config) as engine:
                yield engine
        finally:
            workers[0].stop()


def fox(steps: int, seed: int, **fields) -> OmniDiffusionRequest:
    return OmniDiffusionRequest("a red fox", height=64, width=64, num_inference_steps=steps, seed=seed, **fields)


def pixels(output) -> np.ndarray:
    assert output.error is None, output.error
    return np.asarray(output.images[0])


def admissions(model_name: str) -> float:
    return REGISTRY.get_sample_value("imagegen_running_set_admissions_count", {"model_name": model_name}) or 0


async def long_then_short(engine: DiffusionEngine, long: OmniDiffusionRequest, short: OmniDiffusionRequest):
    """Send ``long``; once it has denoised a step, send ``short``. The outputs, in the order they finished."""
    front = AsyncDiffusionEngine(engine)
    front.start()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def listen(item):
        if isinstance(item, StepProgress) and item.request_id == long.request_id:
            loop.call_soon_threadsafe(started.set)

    engine.progress_listeners.append(listen)
    finished = []

    async def run(request):
        output = await front.generate(request)
        finished.append(output)
        return output

    try:
        long_task = asyncio.ensure_future(run(long))
        await asyncio.wait_for(started.wait(), 120)
        await run(short)
        await long_task
        return finished
    finally:
        engine.progress_listeners.remove(listen)
        await front.close()


@pytest.mark.parametrize("backend", ["ray", "ray_external", "grpc"])
def test_a_short_request_joins_a_long_ones_running_set_on_every_transport(backend, request, request_engine):
    long, short = fox(20, 11, progress=True), fox(3, 12)
    with step_engine_on(backend, request) as engine:
        assert engine.scheduling == "step"
        before = admissions(engine.od_config.model_name)
        finished = asyncio.run(long_then_short(engine, long, short))
        # The iterations' metrics came over the transport too.
        assert admissions(engine.od_config.model_name) > before
    assert [output.request_id for output in finished] == [short.request_id, long.request_id]
    alone = request_engine.step([dataclasses.replace(long, progress=False), short])
    assert_pixels_close(pixels(finished[1]), pixels(alone[0]))
    assert_pixels_close(pixels(finished[0]), pixels(alone[1]))


def test_an_external_worker_started_in_request_mode_makes_the_engine_say_so(request, caplog, ray_cluster):
    actor = RayDiffusionWorkerActor.options(num_gpus=0, num_cpus=1, name="imagegen_request_rank_0").remote(
        rank=0, od_config=OmniDiffusionConfig(model="tiny", scheduling="request")
    )
    try:
        assert ray.get(actor.initialize.remote())["status"] == "ready"
        config = OmniDiffusionConfig(
            model="tiny", scheduling="step", distributed_executor_backend="ray_external",
            worker_actor_names=["imagegen_request_rank_0"],
        )
        with caplog.at_level("WARNING", logger="engine.engine"), DiffusionEngine(config) as engine:
            assert engine.scheduling == "request"
            (output,) = engine.step([fox(2, 5)])
            assert output.error is None
    finally:
        ray.kill(actor)
    assert "rank 0 runs --scheduling request; start it with --scheduling step" in caplog.text


def test_with_data_parallel_a_request_goes_to_the_rank_with_the_most_free_room(model_cache, request_engine):
    config = OmniDiffusionConfig(model="tiny", scheduling="step", num_gpus=2, max_batch_size=2)
    first, second = fox(20, 21, progress=True), fox(3, 22)
    with DiffusionEngine(config) as engine:
        assert engine.scheduling == "step"
        finished = asyncio.run(long_then_short(engine, first, second))
    # Request mode's split would send each lone request to rank 0; rank 0 was busy with the first.
    ranks = {output.request_id: output.rank for output in finished}
    assert ranks == {first.request_id: 0, second.request_id: 1}
    alone = request_engine.step([dataclasses.replace(first, progress=False), second])
    by_id = {output.request_id: output for output in finished}
    assert_pixels_close(pixels(by_id[first.request_id]), pixels(alone[0]))
    assert_pixels_close(pixels(by_id[second.request_id]), pixels(alone[1]))
