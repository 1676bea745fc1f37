"""The real server (uvicorn, one mp worker, tiny model) driven by the official openai client and httpx."""

from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import openai
import pytest
from helpers import ServerProcess, assert_pixels_close, decode, metric_samples

pytestmark = pytest.mark.slow


@pytest.fixture
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def generate(client: openai.OpenAI, seed: int, prompt: str = "a red fox", size: str = "64x64", **extra):
    return client.images.generate(
        prompt=prompt, size=size, extra_body={"seed": seed, "num_inference_steps": 4, **extra}
    )


def test_openai_client_gets_image_of_requested_size(client):
    response = generate(client, seed=1, size="128x128")
    assert len(response.data) == 1
    assert decode(response.data[0].b64_json).shape == (128, 128, 3)
    assert response.size == "128x128"
    assert response.data[0].model_extra["seed"] == 1


def test_n_images_get_consecutive_seeds_and_match_single_requests(client):
    response = client.images.generate(prompt="a red fox", size="64x64", n=3, extra_body={"seed": 7, "num_inference_steps": 4})
    assert [image.model_extra["seed"] for image in response.data] == [7, 8, 9]
    third_alone = decode(generate(client, seed=9).data[0].b64_json)
    assert_pixels_close(decode(response.data[2].b64_json), third_alone)


def test_same_seed_same_pixels_different_seed_different_pixels(client):
    first = decode(generate(client, seed=42).data[0].b64_json)
    again = decode(generate(client, seed=42).data[0].b64_json)
    other = decode(generate(client, seed=43).data[0].b64_json)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 5


def test_seed_reported_when_client_gives_none(client):
    response = client.images.generate(prompt="a red fox", size="64x64", extra_body={"num_inference_steps": 4})
    seed = response.data[0].model_extra["seed"]
    assert isinstance(seed, int)
    assert np.array_equal(decode(response.data[0].b64_json), decode(generate(client, seed=seed).data[0].b64_json))


@pytest.mark.parametrize("output_format, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_output_formats(tiny_server, output_format, magic):
    import base64

    body = {"prompt": "a fox", "size": "64x64", "output_format": output_format, "num_inference_steps": 2}
    response = httpx.post(f"{tiny_server.base_url}/v1/images/generations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert base64.b64decode(response.json()["data"][0]["b64_json"]).startswith(magic)
    assert response.json()["output_format"] == output_format


def test_concurrent_requests_share_the_running_sets_denoiser_calls(tiny_server, client):
    """Step mode, the default: 16 concurrent 4-step requests, each a step of its own, run side by side in the
    worker's running set, in fewer denoiser calls than they would one by one."""

    def steps_and_iterations() -> tuple[float, float]:
        # Zero before the server's first step: this test may be the first on it.
        return tiny_server.metric("imagegen_batch_size_images_count"), tiny_server.metric(
            "imagegen_running_set_admissions_count"
        )

    steps_before, iterations_before = steps_and_iterations()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda seed: generate(client, seed=seed), range(100, 116)))
    assert all(len(r.data) == 1 for r in responses)
    steps, iterations = steps_and_iterations()
    assert steps - steps_before == 16
    assert iterations - iterations_before < 16 * 4


def test_concurrent_requests_are_served_in_batches_in_request_mode():
    server = ServerProcess(
        "--model", "tiny", "--max-batch-size", "8", "--batch-timeout-ms", "20", "--scheduling", "request"
    )
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda seed: generate(client, seed=seed), range(100, 116)))
        assert all(len(r.data) == 1 for r in responses)
        assert server.metric("imagegen_batch_size_images_sum") == 16
        # 16 single-image requests in fewer steps than requests: batches larger than one.
        steps = server.metric("imagegen_batch_size_images_count")
        assert steps < 16
        buckets = metric_samples(server.metrics(), "imagegen_batch_size_images_bucket")
        assert next(sample.value for sample in buckets if sample.labels["le"] == "1.0") < steps
        assert server.metric("imagegen_running_set_admissions_count") == 0
    finally:
        server.stop()


def test_batched_image_matches_the_same_seed_alone(client):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda seed: generate(client, seed=seed), range(200, 208)))
    alone = generate(client, seed=203)
    assert_pixels_close(decode(batched[3].data[0].b64_json), decode(alone.data[0].b64_json))


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_model_card_extensions_tell_what_a_request_may_ask(client):
    """allowed_sizes, default_size, the steps and tasks ride as extension fields the SDK keeps."""
    (card,) = client.models.list()
    extra = card.model_extra
    assert extra == client.models.retrieve("tiny").model_extra
    assert extra["allowed_sizes"][:2] == ["64x64", "128x128"]
    assert (extra["default_num_inference_steps"], extra["max_num_inference_steps"]) == (20, 150)
    assert extra["tasks"] == ["img2img", "inpaint", "text2img"]
    # A request that names no size gets default_size.
    response = client.images.generate(prompt="a red fox", extra_body={"num_inference_steps": 2})
    assert response.size == extra["default_size"]


def test_health_and_metrics(tiny_server, client):
    assert httpx.get(f"{tiny_server.base_url}/health").json() == {"status": "ok", "set_aside": []}
    # A labelled histogram has no samples before its first request: this test may be the server's first.
    generate(client, seed=3)
    text = tiny_server.metrics()
    for name in (
        "imagegen_requests_total",
        "imagegen_request_e2e_time_seconds_bucket",
        "imagegen_request_queue_time_seconds_bucket",
        "imagegen_request_inference_time_seconds_bucket",
        "imagegen_num_requests_waiting",
        "imagegen_num_requests_running",
    ):
        assert metric_samples(text, name), name


BAD_REQUESTS = [
    ({"size": "64x64"}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "a", "size": "100x100"}, "size"),
    ({"prompt": "a", "size": "big"}, "size"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 11}, "n"),
    ({"prompt": "a", "n": "many"}, "n"),
    ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "a", "num_inference_steps": 1000}, "num_inference_steps"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "a", "guidance_scale": 1000}, "guidance_scale"),
    ({"prompt": "a", "output_format": "gif"}, "output_format"),
    ({"prompt": "a", "response_format": "xml"}, "response_format"),
    ({"prompt": "a", "seed": -1}, "seed"),
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_openai_400_naming_the_param(tiny_server, body, param):
    response = httpx.post(f"{tiny_server.base_url}/v1/images/generations", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_unknown_model_gets_openai_404_model_not_found(tiny_server):
    response = httpx.post(f"{tiny_server.base_url}/v1/images/generations", json={"prompt": "a", "model": "dall-e-3"}, timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == {
        "message": "The model 'dall-e-3' does not exist; this server serves 'tiny'.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_unparseable_json_gets_openai_400(tiny_server):
    response = httpx.post(
        f"{tiny_server.base_url}/v1/images/generations",
        content=b'{"prompt": ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_bad_request_for_bad_size(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a", size="100x100")
    assert caught.value.body["param"] == "size"


def test_unknown_route_is_openai_404(tiny_server):
    response = httpx.get(f"{tiny_server.base_url}/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_stage_times_are_measured_for_every_stage(tiny_server, client):
    def stage(name: str, suffix: str) -> float:
        return tiny_server.metric(f"imagegen_request_stage_time_seconds_{suffix}", stage=name)

    stages = ("text_encode", "denoise", "vae_decode", "image_encode")
    before = {name: stage(name, "count") for name in stages}
    generate(client, seed=5)
    for name in stages:
        assert stage(name, "count") == before[name] + 1, name
        assert stage(name, "sum") > 0, name


def test_sizes_outside_the_list_follow_the_models_rule(tiny_server):
    response = tiny_server.post(size="72x96", num_inference_steps=2, timeout=60)
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).shape == (96, 72, 3)
    for size in ("100x100", "2048x2048"):
        refused = tiny_server.post(size=size, num_inference_steps=2, timeout=60)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "size" and "multiples of 8" in error["message"] and "64x64" in error["message"]
