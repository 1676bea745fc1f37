"""Generations, completed: url answers, formats, background, quality, style, size auto, usage, seeds, models.

The session's tiny server, driven by the official openai client (sync and async) and httpx.
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import openai
import pytest
from helpers import assert_pixels_close, decode
from PIL import Image

pytestmark = pytest.mark.slow

STEPS = {"num_inference_steps": 2}


@pytest.fixture
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def post(server, **body) -> httpx.Response:
    return server.post(**{**STEPS, **body})


def test_url_answer_serves_the_image_with_its_content_type(tiny_server, client):
    response = client.images.generate(
        prompt="a red fox", size="64x64", response_format="url", output_format="webp", extra_body={"seed": 3, **STEPS}
    )
    image = response.data[0]
    assert image.b64_json is None
    assert image.url.startswith(f"{tiny_server.base_url}/v1/images/files/")
    fetched = httpx.get(image.url)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).format == "WEBP"
    # The same pixels as the b64_json answer for the same seed.
    again = client.images.generate(
        prompt="a red fox", size="64x64", output_format="webp", extra_body={"seed": 3, **STEPS}
    )
    assert np.array_equal(decode(fetched.content), decode(again.data[0].b64_json))


def test_url_ids_are_random_per_image(client):
    response = client.images.generate(
        prompt="a fox", size="64x64", n=2, response_format="url", extra_body={"seed": 1, **STEPS}
    )
    first, second = (image.url.rsplit("/", 1)[1] for image in response.data)
    assert first != second
    assert len(first.split(".")[0]) >= 43  # 256 random bits


@pytest.mark.parametrize(
    "path",
    ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "nothing.png", "x" * 43 + ".png", "x" * 43 + ".gif"],
)
def test_file_ids_outside_the_store_are_404(tiny_server, path):
    response = httpx.get(f"{tiny_server.base_url}/v1/images/files/{path}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_no_response_format_means_b64_json(client):
    response = client.images.generate(prompt="a fox", size="64x64", extra_body=STEPS)
    assert response.data[0].url is None and response.data[0].b64_json


def test_output_compression_shrinks_jpeg_and_webp(tiny_server):
    for output_format in ("jpeg", "webp"):
        sizes = []
        for compression in (10, 100):
            body = {"output_format": output_format, "output_compression": compression, "seed": 5}
            response = post(tiny_server, **body)
            assert response.status_code == 200, response.text
            sizes.append(len(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert sizes[0] < sizes[1], output_format


def test_transparent_background_is_400_not_supported_by_the_model(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="64x64", background="transparent", output_format="png")
    assert caught.value.body["param"] == "background"
    assert "not supported by the model" in caught.value.body["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_opaque_and_auto_background_are_served_opaque(client):
    for background in ("opaque", "auto"):
        response = client.images.generate(prompt="a fox", size="64x64", background=background, extra_body=STEPS)
        assert response.background == "opaque"
        assert Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).mode == "RGB"


def test_style_is_accepted_and_changes_nothing(client):
    plain = client.images.generate(prompt="a fox", size="64x64", extra_body={"seed": 4, **STEPS})
    for style in ("vivid", "natural"):
        styled = client.images.generate(prompt="a fox", size="64x64", style=style, extra_body={"seed": 4, **STEPS})
        assert np.array_equal(decode(plain.data[0].b64_json), decode(styled.data[0].b64_json))


def test_size_auto_is_the_models_native_size(client):
    response = client.images.generate(prompt="a fox", size="auto", extra_body=STEPS)
    assert response.size == "64x64"
    assert decode(response.data[0].b64_json).shape == (64, 64, 3)


def test_unsupported_size_is_400_naming_the_allowed_ones(tiny_server):
    error = post(tiny_server, size="100x96").json()["error"]
    assert error["param"] == "size"
    assert "64x64" in error["message"] and "1024x1024" in error["message"]


def test_usage_counts_images_and_tokens(client):
    short = client.images.generate(prompt="a fox", size="64x64", n=2, extra_body=STEPS)
    longer = client.images.generate(prompt="a fox in the snow", size="128x128", extra_body=STEPS)
    assert short.usage.model_extra["images"] == 2
    assert short.usage.input_tokens_details.text_tokens < longer.usage.input_tokens_details.text_tokens
    assert short.usage.input_tokens == short.usage.input_tokens_details.text_tokens
    # Output tokens grow with the pixels made: two 64x64 images are half of one 128x128 image.
    assert short.usage.output_tokens * 2 == longer.usage.output_tokens
    assert short.usage.total_tokens == short.usage.input_tokens + short.usage.output_tokens


def test_seed_list_gives_each_image_its_seed(client):
    listed = client.images.generate(prompt="a fox", size="64x64", n=2, extra_body={"seed": [30, 7], **STEPS})
    assert [image.model_extra["seed"] for image in listed.data] == [30, 7]
    alone = client.images.generate(prompt="a fox", size="64x64", extra_body={"seed": 7, **STEPS})
    assert_pixels_close(decode(listed.data[1].b64_json), decode(alone.data[0].b64_json))


@pytest.mark.parametrize("seed", [[1], [1, 2, 3], [1, -2], "x"])
def test_bad_seed_list_is_400_naming_seed(tiny_server, seed):
    response = post(tiny_server, n=2, seed=seed)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "seed"


def test_async_client_generates_concurrently(tiny_server):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(
            *[client.images.generate(prompt="a fox", size="64x64", extra_body={"seed": s, **STEPS}) for s in (1, 2, 1)]
        )

    first, second, third = (decode(response.data[0].b64_json) for response in asyncio.run(main()))
    # Batched together or not, the same seed gives the same pixels (up to float rounding).
    assert_pixels_close(first, third)
    assert np.abs(first - second).mean() > 5


def test_unknown_fields_are_accepted_and_logged_once(tiny_server):
    for _ in range(2):
        assert post(tiny_server, vendor_field_xyz={"a": 1}).status_code == 200
    assert tiny_server.output().count("'vendor_field_xyz'") == 1


@pytest.mark.parametrize(
    "body, param", [({"n": "two"}, "n"), ({"quality": 3}, "quality"), ({"stream": "maybe"}, "stream")]
)
def test_wrong_types_are_400_naming_the_param(tiny_server, body, param):
    response = post(tiny_server, **body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert response.headers["x-should-retry"] == "false"


def test_retrieve_model(client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.body["code"] == "model_not_found"


def test_openapi_describes_every_route(tiny_server):
    schema = httpx.get(f"{tiny_server.base_url}/openapi.json").json()
    for path in (
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/images/files/{file_id}",
        "/v1/models/{model_id}",
    ):
        assert path in schema["paths"], path
    edits = schema["paths"]["/v1/images/edits"]["post"]
    assert set(edits["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "400" in edits["responses"]
