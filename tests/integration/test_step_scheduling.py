"""--scheduling step through the engine: real mp worker processes with the tiny models, requests sent
as they arrive (AsyncDiffusionEngine) and answered as they finish."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import assert_pixels_close, poll
from prometheus_client import REGISTRY

from engine import AsyncDiffusionEngine, DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest
from workers.data import StepProgress
from workers.runtime.step_batching import CANCELLED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def step_engine(model_cache):
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", scheduling="step", max_batch_size=4)) as engine:
        yield engine


@pytest.fixture(scope="module")
def request_engine(model_cache):
    with DiffusionEngine(OmniDiffusionConfig(model="tiny")) as engine:
        yield engine


def fox(steps: int, seed: int, **fields) -> OmniDiffusionRequest:
    return OmniDiffusionRequest("a red fox", height=64, width=64, num_inference_steps=steps, seed=seed, **fields)


def pixels(output) -> list[np.ndarray]:
    assert output.error is None, output.error
    return [np.asarray(image) for image in output.images]


# 4 images: the whole running set (max_batch_size 4). The short one, due at its 3rd step, long before the long
# one's 20th, is sent at once all the same, and the long one pauses for it.
@pytest.mark.parametrize("long_images", [1, 4])
def test_a_short_request_sent_mid_flight_returns_before_the_long_one_with_its_request_mode_pixels(
    step_engine, request_engine, long_images
):
    assert step_engine.scheduling == "step"
    long, short = fox(20, 1, num_images=long_images, progress=True), fox(3, 2)

    async def scenario():
        front = AsyncDiffusionEngine(step_engine)
        front.start()
        finished = []
        try:
            async def run(request):
                output = await front.generate(request)
                finished.append(request.request_id)
                return output

            long_task = asyncio.ensure_future(run(long))
            # The short one goes out once the long one is denoising: its first step has been reported.
            async for item in _progress_of(front, long):
                if isinstance(item, StepProgress):
                    break
            short_output = await run(short)
            assert finished == [short.request_id]  # the long one is still running
            return await long_task, short_output, finished
        finally:
            await front.close()

    long_output, short_output, finished = asyncio.run(scenario())
    assert finished == [short.request_id, long.request_id]
    alone = request_engine.step([dataclasses.replace(long, progress=False), short])
    assert_pixels_close(pixels(long_output)[0], pixels(alone[0])[0])
    assert_pixels_close(pixels(short_output)[0], pixels(alone[1])[0])


def test_the_next_request_is_sent_while_the_leaving_one_has_its_last_step(step_engine):
    full = fox(8, 31, num_images=4, progress=True)  # the whole running set: max_batch_size 4
    later = fox(2, 32)

    def waiting() -> float:
        return REGISTRY.get_sample_value("imagegen_num_requests_waiting", {"model_name": "tiny"})

    async def scenario():
        front = AsyncDiffusionEngine(step_engine)
        front.start()
        try:
            first = asyncio.ensure_future(front.generate(full))
            async for item in _progress_of(front, full):
                if isinstance(item, StepProgress):
                    break
            before = waiting()
            second = asyncio.ensure_future(front.generate(later))
            output = await first
            # Its room freed as its last step began, not when its reply came: the later one left the queue then.
            assert waiting() == before
            return output, await second
        finally:
            await front.close()

    full_output, later_output = asyncio.run(scenario())
    assert len(pixels(full_output)) == 4 and len(pixels(later_output)) == 1


async def _progress_of(front: AsyncDiffusionEngine, request: OmniDiffusionRequest):
    """The progress of a request already running through ``front``, from the engine's listeners."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def listen(item):
        if item.request_id == request.request_id:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    front.engine.progress_listeners.append(listen)
    try:
        for _ in range(10_000):  # bounded: the request has at most that many steps
            yield await asyncio.wait_for(queue.get(), 60)
    finally:
        front.engine.progress_listeners.remove(listen)


def running_set_size(engine: DiffusionEngine) -> float | None:
    labels = {"model_name": engine.od_config.model_name, "rank": "0"}
    return REGISTRY.get_sample_value("imagegen_running_set_size", labels)


def test_a_cancelled_request_leaves_the_running_set_at_the_next_iteration_as_its_metric_shows(step_engine):
    doomed, kept = fox(150, 41), fox(50, 42)
    with ThreadPoolExecutor(2) as pool:
        outputs = [pool.submit(step_engine.step, [request]) for request in (doomed, kept)]
        poll(lambda: running_set_size(step_engine) == 2, 60, "both requests in the running set")
        step_engine.cancel([doomed.request_id])
        # Its next iteration drops it: the set holds the other one alone while that one still denoises.
        poll(lambda: running_set_size(step_engine) == 1, 30, "the cancelled request to leave")
        (cancelled,), (finished,) = (future.result(timeout=120) for future in outputs)
    assert cancelled.error == CANCELLED and cancelled.images == []
    assert finished.error is None and len(finished.images) == 1
    assert running_set_size(step_engine) == 0


def test_the_guides_generate_call_keeps_its_reply_in_step_mode(step_engine, request_engine):
    requests = [fox(4, 11, num_images=2), fox(2, 12)]
    prepared = [step_engine.prepare(request) for request in requests]
    (replies,) = step_engine.collective_rpc("generate", args=(prepared,))
    assert [reply.request_id for reply in replies] == [request.request_id for request in requests]
    expected = request_engine.step(requests)
    for reply, wanted in zip(replies, expected, strict=True):
        assert reply.error is None and len(reply.images) == len(wanted.images)
        for made, image in zip(reply.images, wanted.images, strict=True):
            assert_pixels_close(made, np.asarray(image))


def test_edits_in_step_mode_run_in_request_mode(step_engine, request_engine):
    source = np.asarray(request_engine.step([fox(2, 21)])[0].images[0])
    edit = OmniDiffusionRequest("a blue fox", images=[source], num_inference_steps=4, strength=0.5, seed=22)
    (made,) = step_engine.step([edit])
    (wanted,) = request_engine.step([edit])
    assert (pixels(made)[0] == pixels(wanted)[0]).all()  # the same pipeline call, by itself


@pytest.mark.parametrize(
    ("settings", "level"), [({"scheduling": "step"}, logging.WARNING), ({}, logging.INFO)], ids=["asked", "default"]
)
def test_a_pipeline_without_a_step_loop_runs_as_request_with_one_line_why(model_cache, caplog, settings, level):
    # Asked for, step mode's refusal is a warning; as the default, an info line: it is how such a model runs.
    with caplog.at_level(logging.INFO, logger="engine.engine"):
        with DiffusionEngine(OmniDiffusionConfig(model="tiny-sd3", **settings)) as engine:
            assert engine.scheduling == "request"
            (output,) = engine.step([fox(2, 31)])
            assert output.error is None
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "--scheduling step runs as" in r.getMessage()]
    assert lines == [(level, "--scheduling step runs as request: StableDiffusion3Pipeline has no step loop "
                             "(step mode runs StableDiffusionPipeline, FluxPipeline)")]
