"""tiny-flux2-klein (Flux2KleinPipeline, a list of reference images) loaded from its saved folder by an
in-process worker, and called through the worker and directly."""

import numpy as np
import pytest
import torch
from PIL import Image

from workers import OmniDiffusionConfig, OmniDiffusionRequest, WorkerWrapperBase


def reference(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def klein(model_cache):
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny-flux2-klein", device="cpu"))
    worker.initialize()
    yield worker
    worker.shutdown()


def request(prompt: str, seed: int, **fields) -> OmniDiffusionRequest:
    return OmniDiffusionRequest(prompt, 64, 64, num_inference_steps=2, seed=seed, **fields)


def test_klein_is_described_as_an_edit_model_with_up_to_16_input_images(klein, model_cache):
    # The worker loaded the folder _ensure_builtin saved, not the object the builder made.
    assert (model_cache / "tiny-flux2-klein" / "model_index.json").is_file()
    description = klein.describe()
    assert description["pipeline"] == "Flux2KleinPipeline"
    assert description["edit_model"] is True
    assert description["max_input_images"] == 16
    assert {"text2img", "img2img"} <= set(description["tasks"])


def test_each_of_two_references_reaches_the_loaded_pipeline(klein):
    def call(second: Image.Image) -> np.ndarray:
        images = klein.pipeline(
            prompt="put them together",
            image=[Image.fromarray(reference(1)), second],
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        assert images.shape == (1, 64, 64, 3)
        return (images[0] * 255).round()

    # A second reference turned from black to white moves the pixels by about 7 levels in 255 on
    # average; a repeated or rebatched call stays within 1/255 of its pixels (helpers.assert_pixels_close).
    difference = np.abs(call(Image.new("RGB", (64, 64), "white")) - call(Image.new("RGB", (64, 64), "black")))
    assert difference.mean() > 2


def test_klein_text_to_image_through_the_worker_keeps_the_requested_size(klein):
    (output,) = klein.generate([request("a fox", 1)])
    assert output.error is None
    assert [image.shape for image in output.images] == [(64, 64, 3)]


def test_klein_edit_makes_num_images_from_one_reference(klein):
    (output,) = klein.generate([request("make it red", 2, image=reference(2), num_images=2)])
    assert output.error is None
    assert [image.shape for image in output.images] == [(64, 64, 3)] * 2
    assert not np.array_equal(*output.images)  # one seed per image
