"""Rank groups on the mp backend: CFG pairs (two real worker processes meeting over gloo) beside data
parallel, checked against one rank making the same images alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import assert_pixels_close
from lora_adapters import make_lora

from engine import DiffusionEngine, LoraWeight, OmniDiffusionConfig, OmniDiffusionRequest
from engine.engine import PartialImages
from workers.config import LoraModule
from workers.data import StepProgress
from workers.worker import WorkerWrapperBase

pytestmark = pytest.mark.slow

# Guidance above 1: the pipeline runs CFG, as a doubled batch the pair splits.
GUIDED = {"num_inference_steps": 4, "guidance_scale": 6.0}


def requests_for(seeds, **fields) -> list[OmniDiffusionRequest]:
    return [OmniDiffusionRequest("a red fox", seed=seed, **{**GUIDED, **fields}) for seed in seeds]


def pixels(output) -> list[np.ndarray]:
    assert output.error is None, output.error
    return [np.asarray(image) for image in output.images]


@pytest.fixture(scope="module")
def alone():
    """One rank, no group: the images the groups must make."""
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny", device="cpu"))
    worker.initialize()
    return worker


@pytest.fixture(scope="module")
def one_pair():
    """2 ranks = one CFG pair: the rank group of every test but data parallel's (two processes, not four)."""
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=2, cfg_parallel_size=2)) as engine:
        yield engine


def test_two_cfg_pairs_share_a_step_and_make_the_pixels_of_one_rank(alone):
    # 4 ranks = 2 data-parallel groups x a CFG pair each, for this test alone.
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=4, cfg_parallel_size=2)) as two_pairs:
        groups = [info["rank_group"] for info in two_pairs.collective_rpc("describe")]
        requests = requests_for([1, 2, 3, 4])
        outputs = two_pairs.step(requests)
        references = alone.generate([two_pairs.prepare(r) for r in requests])
    assert [(g["index"], g["rank_in_group"]) for g in groups] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {g["cfg_parallel_size"] for g in groups} == {2}
    # The leaders (ranks 0 and 2) answer, one group each half of the step.
    assert sorted({output.rank for output in outputs}) == [0, 2]
    for output, reference in zip(outputs, references):
        assert_pixels_close(pixels(output)[0], reference.images[0])


def test_partial_images_and_progress_come_once_from_the_leader(one_pair):
    seen: list = []
    one_pair.progress_listeners.append(seen.append)
    try:
        (request,) = requests_for([5], num_inference_steps=6, partial_images=2, progress=True)
        (output,) = one_pair.step([request])
    finally:
        one_pair.progress_listeners.remove(seen.append)
    assert output.error is None
    partials = [p for p in seen if isinstance(p, PartialImages) and p.request_id == request.request_id]
    steps = [p.step for p in seen if isinstance(p, StepProgress) and p.request_id == request.request_id]
    assert [p.index for p in partials] == [0, 1]
    assert steps == list(range(1, 7))


def test_a_pair_cancelled_mid_denoise_stops_as_one_and_serves_the_next_request(one_pair, alone):
    (long,) = requests_for([6], num_inference_steps=150, progress=True)
    second_step = threading.Event()

    def on_progress(progress) -> None:
        if isinstance(progress, StepProgress) and progress.request_id == long.request_id and progress.step >= 2:
            second_step.set()

    one_pair.progress_listeners.append(on_progress)
    try:
        with_cancel = threading.Thread(target=lambda: second_step.wait(120) and one_pair.cancel([long.request_id]))
        with_cancel.start()
        (output,) = one_pair.step([long])
        with_cancel.join()
    finally:
        one_pair.progress_listeners.remove(on_progress)
    assert second_step.is_set()
    assert output.images == [] and "cancelled" in output.error
    (after,) = requests_for([7])
    (served,) = one_pair.step([after])
    (reference,) = alone.generate([one_pair.prepare(after)])
    assert_pixels_close(pixels(served)[0], reference.images[0])


def test_guidance_off_runs_the_whole_batch_on_both_ranks(one_pair, alone):
    # guidance_scale 1 leaves nothing to split: each rank runs the call as one rank would.
    requests = requests_for([8], guidance_scale=1.0)
    (output,) = one_pair.step(requests)
    (reference,) = alone.generate([one_pair.prepare(requests[0])])
    assert_pixels_close(pixels(output)[0], reference.images[0])


@pytest.mark.parametrize("cache_method", ["none", "pab"])
def test_a_cfg_pair_of_a_dit_with_true_cfg_makes_the_pixels_of_one_rank(cache_method):
    # tiny-sd3: its transformer takes the doubled batch by keyword (hidden_states, pooled_projections, a timestep
    # each). PAB decides by the timestep, so each half of the pair skips the steps one rank would skip.
    settings = {"model": "tiny-sd3", "cache_method": cache_method}
    alone = WorkerWrapperBase(0, OmniDiffusionConfig(device="cpu", **settings))
    requests = requests_for([9, 10], num_images=2)
    with DiffusionEngine(OmniDiffusionConfig(num_gpus=2, cfg_parallel_size=2, **settings)) as pair:
        assert pair.model_info["levers"]["cache_method"] == cache_method
        outputs = pair.step(requests)
        references = alone.generate([pair.prepare(r) for r in requests])
    for output, reference in zip(outputs, references):
        for image, expected in zip(pixels(output), reference.images, strict=True):
            assert_pixels_close(image, expected)


def test_a_lora_adapter_runs_on_both_ranks_of_a_pair(one_pair, alone, model_cache, tmp_path):
    folder = make_lora(tmp_path / "sharp", model_cache, seed=1)
    one_pair.loras.load(LoraModule("sharp", str(folder)))
    alone.load_lora_adapter("sharp", str(folder))
    try:
        (request,) = requests_for([11], loras=(LoraWeight("sharp"),))
        (output,) = one_pair.step([request])
        (reference,) = alone.generate([one_pair.prepare(request)])
        (base,) = alone.generate([one_pair.prepare(requests_for([11])[0])])
    finally:
        one_pair.loras.unload("sharp")
        alone.unload_lora_adapter("sharp")
    assert_pixels_close(pixels(output)[0], reference.images[0])
    assert np.abs(pixels(output)[0].astype(int) - base.images[0]).max() > 8  # the adapter did something
