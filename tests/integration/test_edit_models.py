"""Instruction-edit models (workers/runtime/edits.py) on an in-process worker: tiny-kontext."""

import dataclasses

import numpy as np
import openai
import pytest
from helpers import ServerProcess, assert_pixels_close, decode, png_bytes, random_pixels
from lora_adapters import make_flux_lora

from workers import OmniDiffusionConfig, OmniDiffusionRequest, WorkerWrapperBase
from workers.data import LoraWeight


@pytest.fixture(scope="module")
def kontext(model_cache):
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny-kontext", device="cpu"))
    worker.initialize()
    yield worker
    worker.shutdown()


def edit(prompt: str, seed: int, **fields) -> OmniDiffusionRequest:
    return OmniDiffusionRequest(prompt, 64, 64, seed=seed, **{"num_inference_steps": 2, **fields})


def test_kontext_is_described_as_an_edit_model_with_one_input_image(kontext):
    description = kontext.describe()
    assert description["edit_model"] is True
    assert description["max_input_images"] == 1
    assert description["tasks"] == ["img2img", "inpaint", "text2img"]
    assert type(kontext.pipelines["inpaint"]).__name__ == "FluxKontextInpaintPipeline"
    assert kontext.pipelines["inpaint"].transformer is kontext.pipelines["text2img"].transformer


def test_kontext_edit_keeps_the_requested_size_and_runs_text_to_image_too(kontext):
    edited, plain = kontext.generate([edit("a fox", 1, images=[random_pixels(1)]), edit("a fox", 1)])
    assert edited.error is None and plain.error is None
    assert edited.images[0].shape == plain.images[0].shape == (64, 64, 3)
    assert not np.array_equal(edited.images[0], plain.images[0])  # the reference changes the image


def test_two_kontext_edits_batched_give_the_pixels_each_gives_alone_within_1_of_255(kontext):
    a, b = edit("a fox", 3, images=[random_pixels(3)]), edit("a cat", 4, images=[random_pixels(4)])
    together = kontext.generate([a, b])
    for request, output in zip((a, b), together):
        alone = kontext.generate([request])[0]
        assert_pixels_close(output.images[0], alone.images[0])


def test_kontext_inpaint_keeps_the_unmasked_region_within_1_of_255(kontext):
    image = random_pixels(5)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    (output,) = kontext.generate([edit("a fox", 5, images=[image], mask=mask)])
    assert output.error is None
    kept = np.abs(output.images[0][:, 40:].astype(int) - image[:, 40:].astype(int))  # away from the seam
    assert kept.mean() <= 1


@pytest.fixture(scope="module")
def kontext_server(model_cache):
    server = ServerProcess("--model", "tiny-kontext", "--scheduling", "step", "--default-num-inference-steps", "2")
    yield server
    server.stop()


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_kontext_edit_through_the_openai_client_keeps_the_reference_size(kontext_server):
    result = client(kontext_server).images.edit(
        model="tiny-kontext",
        image=("ref.png", png_bytes(random_pixels(7))),
        prompt="make it red",
        input_fidelity="high",
    )
    assert decode(result.data[0].b64_json).shape == (64, 64, 3)
    card = client(kontext_server).models.retrieve("tiny-kontext").model_extra
    assert card["max_input_images"] == 1 and "img2img" in card["tasks"]


def test_an_edit_without_a_size_makes_the_first_images_size_rounded_to_the_models_multiple(kontext_server):
    # 66x46: 64x48 at a multiple of 8 or 16.
    odd = random_pixels(11, height=46, width=66)
    result = client(kontext_server).images.edit(image=("ref.png", png_bytes(odd)), prompt="make it red", size="auto")
    assert (result.size, decode(result.data[0].b64_json).shape) == ("64x48", (48, 64, 3))


def test_a_second_image_for_kontext_is_a_400_naming_the_models_limit(kontext_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client(kontext_server).images.edit(image=[("a.png", png_bytes(random_pixels(1)))] * 2, prompt="x")
    assert caught.value.body["param"] == "image"
    assert "2 images were sent; the model 'tiny-kontext' takes at most 1 per request" in caught.value.body["message"]


def test_kontext_inpaint_keeps_the_unmasked_region_of_the_png_it_answers(kontext_server):
    image = random_pixels(12)
    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[:, :32, 3] = 0  # transparent: the left half is repainted
    result = client(kontext_server).images.edit(
        image=("in.png", png_bytes(image)), mask=("mask.png", png_bytes(mask)), prompt="a fox", extra_body={"seed": 12}
    )
    edited = decode(result.data[0].b64_json).astype(int)
    assert np.abs(edited[:, 40:] - image[:, 40:].astype(int)).mean() <= 1  # away from the seam
    assert np.abs(edited[:, :24] - image[:, :24].astype(int)).mean() > 10  # the masked half was repainted


def test_a_kontext_edit_streams_its_partial_images_as_image_edit_events(kontext_server):
    events = list(
        client(kontext_server).images.edit(
            image=("ref.png", png_bytes(random_pixels(14))), prompt="make it red", stream=True, partial_images=1,
            extra_body={"seed": 14, "num_inference_steps": 3},
        )
    )
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    final = decode(events[-1].b64_json)
    assert final.shape == (64, 64, 3)


def test_step_mode_falls_back_to_request_mode_for_kontext_with_one_line_at_start_up(kontext_server):
    lines = [line for line in kontext_server.output().splitlines() if "--scheduling step runs as request" in line]
    assert len(lines) == 1 and "FluxKontextPipeline has no step loop" in lines[0], lines


def test_kontext_edit_returns_its_partial_images_and_progress(kontext):
    progress = []
    kontext.progress_sink = progress.append
    try:
        (output,) = kontext.generate([edit("a fox", 8, images=[random_pixels(8)], partial_images=1, progress=True)])
    finally:
        kontext.progress_sink = None
    assert output.error is None
    kinds = {type(item).__name__ for item in progress}
    assert {"PartialImageOutput", "StepProgress"} <= kinds, kinds


def test_a_lora_adapter_changes_a_kontext_edit_and_leaves_the_base_as_it_was(kontext, model_cache, tmp_path):
    request = edit("a fox", 9, images=[random_pixels(9)])
    (before,) = kontext.generate([request])
    loaded = kontext.load_lora_adapter("sharp", str(make_flux_lora(tmp_path / "sharp", "tiny-kontext", model_cache, 1)))
    assert "error" not in loaded, loaded
    try:
        with_sharp = edit("a fox", 9, images=[random_pixels(9)], loras=(LoraWeight("sharp", 4.0),))
        (with_adapter,) = kontext.generate([with_sharp])
        (after,) = kontext.generate([request])
    finally:
        assert kontext.unload_lora_adapter("sharp")
    assert with_adapter.error is None
    assert np.abs(with_adapter.images[0].astype(int) - before.images[0].astype(int)).mean() > 2
    assert_pixels_close(after.images[0], before.images[0])


def test_a_cancelled_kontext_edit_stops_at_its_next_step(kontext):
    request = edit("a fox", 10, images=[random_pixels(10)], num_inference_steps=50)
    progress = []
    kontext.progress_sink = progress.append
    kontext.cancel([request.request_id])  # the client went away before its first step ended
    try:
        (output,) = kontext.generate([request])
    finally:
        kontext.progress_sink = None
    assert output.error.startswith("cancelled") and output.images == []
    assert kontext.pipelines["img2img"].interrupt  # diffusers skipped the 49 steps left
    assert not progress


def test_a_step_cache_runs_on_kontext_edits_and_a_request_without_it_gets_the_plain_pixels(kontext):
    cached_worker = WorkerWrapperBase(
        0, OmniDiffusionConfig(model="tiny-kontext", device="cpu", cache_method="pab")
    )
    cached_worker.initialize()
    try:
        request = edit("a fox", 13, images=[random_pixels(13)], num_inference_steps=6)
        (plain,) = kontext.generate([request])
        (uncached,) = cached_worker.generate([dataclasses.replace(request, cache=False)])
        (cached,) = cached_worker.generate([request])
    finally:
        cached_worker.shutdown()
    assert cached_worker.levers.description["cache_hooked_modules"] > 0
    assert np.array_equal(uncached.images[0], plain.images[0])
    assert not np.array_equal(cached.images[0], plain.images[0])  # the cache skipped work
