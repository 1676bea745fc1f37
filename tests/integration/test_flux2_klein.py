"""tiny-flux2-klein (Flux2KleinPipeline, a list of reference images) loaded from its saved folder by an
in-process worker and called through it and directly; and served over HTTP by a server whose one
rank is an `imagegen worker` reached over gRPC, so several references cross the worker contract."""

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
from helpers import ServerProcess, WorkerProcess, assert_pixels_close, decode, png_bytes, random_pixels
from PIL import Image

from workers import OmniDiffusionConfig, OmniDiffusionRequest, WorkerWrapperBase
from workers.data import PartialImageOutput, StepProgress
from workers.runtime.stages import decode_latents, to_uint8


@pytest.fixture(scope="module")
def klein(model_cache):
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny-flux2-klein", device="cpu"))
    worker.initialize()
    yield worker
    worker.shutdown()


def request(prompt: str, seed: int, **fields) -> OmniDiffusionRequest:
    return OmniDiffusionRequest(prompt, seed=seed, **{"height": 64, "width": 64, "num_inference_steps": 2, **fields})


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
            image=[Image.fromarray(random_pixels(1)), second],
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
    (output,) = klein.generate([request("make it red", 2, images=[random_pixels(2)], num_images=2)])
    assert output.error is None
    assert [image.shape for image in output.images] == [(64, 64, 3)] * 2
    assert not np.array_equal(*output.images)  # one seed per image


def test_two_edits_run_one_call_each_with_their_own_references(klein):
    a = request("make it red", 3, images=[random_pixels(3), random_pixels(4)])
    b = request("make it blue", 5, images=[random_pixels(5)])
    together = klein.generate([a, b])
    for alone_request, output in zip((a, b), together):
        (alone,) = klein.generate([alone_request])
        assert_pixels_close(output.images[0], alone.images[0])


# -- over HTTP and gRPC -----------------------------------------------------------------------------
BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def klein_server(model_cache):
    worker = WorkerProcess(0, "--model", "tiny-flux2-klein")
    server = ServerProcess(
        "--model", "tiny-flux2-klein", "--backend", "grpc", "--worker-addresses", worker.address,
        "--default-num-inference-steps", "2", "--max-request-body-bytes", str(BODY_LIMIT),
    )
    yield server
    server.stop()
    worker.stop()


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_several_references_over_http_and_grpc_make_the_in_process_workers_pixels(klein_server, klein):
    first = random_pixels(6, height=98, width=67)  # 64x96 at a multiple of 8 or 16
    references = [first, random_pixels(7), random_pixels(8)]
    result = client(klein_server).images.edit(
        image=[(f"r{index}.png", png_bytes(image)) for index, image in enumerate(references)],
        prompt="put them together",
        extra_body={"seed": 9},
    )
    assert result.size == "64x96"
    def alone(images: list[np.ndarray]):
        return klein.generate([request("put them together", 9, height=96, images=images)])[0]

    alone, without_last = alone(references), alone(references[:2])
    assert_pixels_close(decode(result.data[0].b64_json), alone.images[0])
    assert np.abs(without_last.images[0].astype(int) - alone.images[0].astype(int)).mean() > 1  # the third one counts
    # Each reference counts its own latent positions.
    assert result.usage.input_tokens_details.image_tokens == alone.usage.input_image_tokens
    assert alone.usage.input_image_tokens > without_last.usage.input_image_tokens > 0


def test_json_images_in_order_and_a_seventeenth_is_a_400(klein_server):
    def data_url(image: np.ndarray) -> dict:
        return {"image_url": "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()}

    url = f"{klein_server.base_url}/v1/images/edits"
    images = [data_url(random_pixels(7)), data_url(random_pixels(8))]
    body = {"prompt": "put them together", "seed": 9, "images": images}
    response = httpx.post(url, json=body, timeout=120)
    assert response.status_code == 200, response.text
    small = np.zeros((8, 8, 3), np.uint8)
    response = httpx.post(url, json={**body, "images": [data_url(small)] * 17}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "images"


def test_sixteen_images_over_the_body_limit_get_a_413_naming_the_setting(klein_server):
    noise = [random_pixels(seed, height=96, width=96) for seed in range(16)]
    files = [("image[]", (f"r{index}.png", png_bytes(image), "image/png")) for index, image in enumerate(noise)]
    assert sum(len(file[1][1]) for file in files) > BODY_LIMIT > len(files[0][1][1])
    response = httpx.post(
        f"{klein_server.base_url}/v1/images/edits", files=files, data={"prompt": "put them together"}, timeout=60
    )
    assert response.status_code == 413
    assert "--max-request-body-bytes" in response.json()["error"]["message"]


def test_a_reference_under_the_pipelines_smallest_side_is_a_400(klein_server):
    with pytest.raises(openai.BadRequestError) as caught:
        client(klein_server).images.edit(
            image=[("a.png", png_bytes(random_pixels(1))), ("b.png", png_bytes(random_pixels(2)[:32]))], prompt="x"
        )
    assert caught.value.body["param"] == "image"
    assert "image 1 is 64x32; the model 'tiny-flux2-klein' takes references whose sides are at least 64" in (
        caught.value.body["message"]
    )


def test_a_mask_on_a_model_without_an_inpaint_variant_is_a_400_naming_the_model(klein_server):
    mask = np.zeros((64, 64, 4), np.uint8)  # all transparent: repaint everything
    with pytest.raises(openai.BadRequestError) as caught:
        client(klein_server).images.edit(
            image=("a.png", png_bytes(random_pixels(1))), mask=("m.png", png_bytes(mask)), prompt="x"
        )
    assert caught.value.body["param"] == "mask"
    assert "'tiny-flux2-klein' does not support inpaint" in caught.value.body["message"]


def test_generations_on_klein_are_text_to_image_at_the_asked_size(klein_server):
    result = client(klein_server).images.generate(prompt="a fox", size="64x32")
    assert decode(result.data[0].b64_json).shape == (32, 64, 3)


def test_a_partial_image_decodes_the_latents_as_the_pipeline_itself_does(klein):
    last = {}

    def keep_latents(pipeline, index, timestep, tensors):
        last["latents"] = tensors["latents"]
        return {}

    final = klein.pipeline(
        prompt="a fox", image=[Image.fromarray(random_pixels(3))], height=64, width=96, num_inference_steps=2,
        generator=torch.Generator().manual_seed(3), output_type="np", callback_on_step_end=keep_latents,
    ).images
    # The last step's latents, decoded as a partial image is, are the pipeline's own output.
    with torch.inference_mode():  # as the worker's calls run
        decoded = decode_latents(klein.pipeline, last["latents"], 64, 96)
    assert_pixels_close(to_uint8(decoded), to_uint8(final))


def test_klein_edit_streams_partial_images_and_progress(klein):
    progress = []
    klein.progress_sink = progress.append
    try:
        edit = request("a fox", 4, images=[random_pixels(4)], num_inference_steps=3, partial_images=2, progress=True)
        (output,) = klein.generate([edit])
    finally:
        klein.progress_sink = None
    assert output.error is None
    partials = [item for item in progress if isinstance(item, PartialImageOutput)]
    assert [p.index for p in partials] == [0, 1] and partials[0].images[0].shape == (64, 64, 3)
    assert [item.step for item in progress if isinstance(item, StepProgress)] == [1, 2, 3]
