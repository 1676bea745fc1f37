"""Instruction-edit models (workers/runtime/edits.py) on an in-process worker: tiny-kontext."""

import base64
import io

import numpy as np
import openai
import pytest
from helpers import ServerProcess, assert_pixels_close
from PIL import Image

from workers import OmniDiffusionConfig, OmniDiffusionRequest, WorkerWrapperBase


def reference(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def kontext(model_cache):
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny-kontext", device="cpu"))
    worker.initialize()
    yield worker
    worker.shutdown()


def edit(prompt: str, seed: int, **fields) -> OmniDiffusionRequest:
    return OmniDiffusionRequest(prompt, 64, 64, num_inference_steps=2, seed=seed, **fields)


def test_kontext_is_described_as_an_edit_model_with_one_input_image(kontext):
    description = kontext.describe()
    assert description["edit_model"] is True
    assert description["max_input_images"] == 1
    assert description["tasks"] == ["img2img", "inpaint", "text2img"]
    assert type(kontext.pipelines["inpaint"]).__name__ == "FluxKontextInpaintPipeline"
    assert kontext.pipelines["inpaint"].transformer is kontext.pipelines["text2img"].transformer


def test_kontext_edit_keeps_the_requested_size_and_runs_text_to_image_too(kontext):
    edited, plain = kontext.generate([edit("a fox", 1, image=reference(1)), edit("a fox", 1)])
    assert edited.error is None and plain.error is None
    assert edited.images[0].shape == plain.images[0].shape == (64, 64, 3)
    assert not np.array_equal(edited.images[0], plain.images[0])  # the reference changes the image


def test_two_kontext_edits_batched_give_the_pixels_each_gives_alone_within_1_of_255(kontext):
    a, b = edit("a fox", 3, image=reference(3)), edit("a cat", 4, image=reference(4))
    together = kontext.generate([a, b])
    for request, output in zip((a, b), together):
        alone = kontext.generate([request])[0]
        assert_pixels_close(output.images[0], alone.images[0])


def test_kontext_inpaint_keeps_the_unmasked_region_within_1_of_255(kontext):
    image = reference(5)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    (output,) = kontext.generate([edit("a fox", 5, image=image, mask=mask)])
    assert output.error is None
    kept = np.abs(output.images[0][:, 40:].astype(int) - image[:, 40:].astype(int))  # away from the seam
    assert kept.mean() <= 1


@pytest.fixture(scope="module")
def kontext_server(model_cache):
    server = ServerProcess("--model", "tiny-kontext")
    yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    server.stop()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_kontext_edit_through_the_openai_client_keeps_the_reference_size(kontext_server):
    result = kontext_server.images.edit(
        model="tiny-kontext", image=("ref.png", png(reference(7))), prompt="make it red", input_fidelity="high"
    )
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)
    card = kontext_server.models.retrieve("tiny-kontext").model_extra
    assert card["max_input_images"] == 1 and "img2img" in card["tasks"]


def test_kontext_edit_returns_its_partial_images_and_progress(kontext):
    progress = []
    kontext.progress_sink = progress.append
    try:
        (output,) = kontext.generate([edit("a fox", 8, image=reference(8), partial_images=1, progress=True)])
    finally:
        kontext.progress_sink = None
    assert output.error is None
    kinds = {type(item).__name__ for item in progress}
    assert {"PartialImageOutput", "StepProgress"} <= kinds, kinds
