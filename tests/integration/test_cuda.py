"""CUDA paths: device placement, half precision, two worker processes on one GPU, offload, a full-size
random-weight model. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def requests_for(seeds, size=64):
    return [OmniDiffusionRequest("a red fox", width=size, height=size, num_inference_steps=4, seed=s) for s in seeds]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_worker_runs_in_the_requested_dtype(dtype):
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", device="cuda", dtype=dtype)) as engine:
        assert engine.model_info["device"] == "cuda:0"
        assert engine.model_info["dtype"] == dtype
        first, again = engine.step(requests_for([5, 5]))
    pixels = np.asarray(first.images[0], dtype=np.int16)
    assert pixels.std() > 1  # not a blank (NaN -> black) image
    assert np.abs(pixels - np.asarray(again.images[0], dtype=np.int16)).max() <= 1


def test_auto_picks_cuda_and_bfloat16():
    with DiffusionEngine(OmniDiffusionConfig(model="tiny")) as engine:
        assert engine.model_info["device"].startswith("cuda")
        assert engine.model_info["dtype"] == "bfloat16"


def test_two_workers_share_one_gpu_and_split_a_step():
    config = OmniDiffusionConfig(model="tiny", device="cuda", num_gpus=2)
    with DiffusionEngine(config) as engine:
        devices = [info["device"] for info in engine.collective_rpc("describe")]
        outputs = engine.step(requests_for(range(8), size=128))
    assert devices == [f"cuda:{rank % torch.cuda.device_count()}" for rank in range(2)]
    assert {output.rank for output in outputs} == {0, 1}
    assert all(output.images[0].size == (128, 128) for output in outputs)


def test_tiny_flux_on_cuda():
    with DiffusionEngine(OmniDiffusionConfig(model="tiny-flux", device="cuda")) as engine:
        (output,) = engine.step(requests_for([1]))
    assert output.error is None and output.images[0].size == (64, 64)


def test_edits_inpainting_and_partial_images_on_cuda():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    common = {"num_inference_steps": 4, "seed": 3}
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", device="cuda", dtype="bfloat16")) as engine:
        partials = []
        engine.progress_listeners.append(partials.append)
        img2img, inpaint, streamed = engine.step([
            OmniDiffusionRequest("a fox", images=[image], **common),
            OmniDiffusionRequest("a fox", images=[image], mask=mask, **common),
            OmniDiffusionRequest("a fox", width=64, height=64, partial_images=2, **common),
        ])
    for output in (img2img, inpaint, streamed):
        assert output.error is None, output.error
        assert output.images[0].size == (64, 64)
        assert np.asarray(output.images[0]).std() > 1
    assert [(p.request_id, p.index) for p in partials] == [(streamed.request_id, 0), (streamed.request_id, 1)]


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_keeps_weights_on_the_cpu_and_still_generates(offload):
    config = OmniDiffusionConfig(model="tiny", device="cuda", dtype="float32", offload=offload)
    with DiffusionEngine(config) as engine:
        assert engine.model_info["levers"]["offload"] == offload
        (output,) = engine.step(requests_for([5]))
    assert output.error is None, output.error
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", device="cuda", dtype="float32")) as engine:
        (plain,) = engine.step(requests_for([5]))
    # The same modules run on the same GPU, only moved there when they run.
    assert np.abs(np.asarray(output.images[0], dtype=np.int16) - np.asarray(plain.images[0], dtype=np.int16)).max() <= 1


def test_random_sd15_runs_on_cuda_in_bfloat16_with_vae_tiling():
    config = OmniDiffusionConfig(model="random-sd15", device="cuda", vae_tiling=True, vae_slicing=True)
    with DiffusionEngine(config) as engine:
        assert engine.model_info["dtype"] == "bfloat16"
        (output,) = engine.step(requests_for([1], size=512))
    assert output.error is None and output.images[0].size == (512, 512)


def test_a_cfg_pair_on_one_gpu_meets_over_gloo_and_makes_the_pixels_of_one_rank():
    # One GPU: NCCL refuses two ranks on one device, so the pair's collectives go over gloo on the CPU.
    requests = [OmniDiffusionRequest("a red fox", 64, 64, num_inference_steps=4, guidance_scale=6.0, seed=s)
                for s in (1, 2)]
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", device="cuda", dtype="float32")) as alone:
        references = alone.step(requests)
    config = OmniDiffusionConfig(model="tiny", device="cuda", dtype="float32", num_gpus=2, cfg_parallel_size=2)
    with DiffusionEngine(config) as pair:
        outputs = pair.step(requests)
    for output, reference in zip(outputs, references):
        difference = np.abs(np.asarray(output.images[0], np.int16) - np.asarray(reference.images[0], np.int16))
        assert output.rank == 0 and difference.max() <= 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallel over NCCL needs a GPU per rank")
def test_ulysses_2_on_two_gpus_makes_the_pixels_of_one_rank():
    requests = [OmniDiffusionRequest("a red fox", 128, 128, num_inference_steps=4, seed=3)]
    with DiffusionEngine(OmniDiffusionConfig(model="tiny-flux", device="cuda", dtype="float32")) as alone:
        (reference,) = alone.step(requests)
    config = OmniDiffusionConfig(model="tiny-flux", device="cuda", dtype="float32", num_gpus=2, ulysses_degree=2)
    with DiffusionEngine(config) as group:
        (output,) = group.step(requests)
    difference = np.abs(np.asarray(output.images[0], np.int16) - np.asarray(reference.images[0], np.int16))
    assert difference.max() <= 2
