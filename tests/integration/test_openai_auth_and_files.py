"""API keys, url answers by default (DALL-E style), a public base URL, file expiry, quality -> steps.

One server of this module's own: two API keys, /metrics behind them, url answers by default, a
short image TTL, a storage folder the test can look into, and 2 denoising steps by default.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import openai
import pytest
from helpers import ServerProcess, decode, metric_samples, poll

pytestmark = pytest.mark.slow

KEYS = ("sk-first-key", "sk-second-key")
PUBLIC_BASE = "https://proxy.example/imagegen"
TTL_S = 5


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def server(storage):
    server = ServerProcess(
        "--default-response-format", "url",
        "--public-base-url", PUBLIC_BASE,
        "--image-storage-dir", str(storage),
        "--image-ttl-s", str(TTL_S),
        "--metrics-require-api-key", "true",
        "--default-num-inference-steps", "2",
        env={"IMAGEGEN_API_KEY": ",".join(KEYS)},
    )  # fmt: skip
    yield server
    server.stop()


def client(server, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def local(url: str, server) -> str:
    """A public image URL as this test reaches it (no proxy here)."""
    assert url.startswith(f"{PUBLIC_BASE}/v1/images/files/"), url
    return server.base_url + url.removeprefix(PUBLIC_BASE)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic sk-first-key"}, {"Authorization": "Bearer"}],
)
@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/tiny", "/v1/nothing"])
def test_v1_routes_without_a_valid_key_are_401_openai_errors(server, headers, path):
    response = httpx.get(f"{server.base_url}{path}", headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert "sk-wrong" not in error["message"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_post_without_key_is_401_and_generates_nothing(server):
    def images_generated() -> float:
        text = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {KEYS[0]}"}).text
        return sum(sample.value for sample in metric_samples(text, "imagegen_images_generated_total"))

    before = images_generated()
    response = httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "a fox", "size": "64x64"})
    assert response.status_code == 401
    assert response.headers["x-should-retry"] == "false"
    assert images_generated() == before


def test_official_client_gets_authentication_error_for_a_wrong_key(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, "sk-wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"


def test_every_configured_key_works_sync_and_async(server):
    assert [m.id for m in client(server, KEYS[0]).models.list()] == ["tiny"]

    async def with_second_key():
        async_client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS[1], max_retries=0)
        return await async_client.models.retrieve("tiny")

    assert asyncio.run(with_second_key()).id == "tiny"


def test_probes_stay_open_and_metrics_need_a_key_when_configured(server):
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/ready").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 401
    authorized = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert authorized.status_code == 200 and "imagegen_requests_total" in authorized.text


def test_url_is_the_default_answer_under_the_public_base_url(server, storage):
    response = client(server).images.generate(prompt="a fox", size="64x64", extra_body={"seed": 1})
    url = response.data[0].url
    assert response.data[0].b64_json is None
    assert (storage / url.rsplit("/", 1)[1]).is_file()
    # The id is the credential: the file is served without a key, as OpenAI's signed URLs are.
    fetched = httpx.get(local(url, server))
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    as_b64 = client(server).images.generate(
        prompt="a fox", size="64x64", response_format="b64_json", extra_body={"seed": 1}
    )
    assert np.array_equal(decode(fetched.content), decode(as_b64.data[0].b64_json))


def test_files_expire_after_the_ttl_and_are_then_404(server, storage):
    url = client(server).images.generate(prompt="a fox", size="64x64").data[0].url
    name = url.rsplit("/", 1)[1]
    assert httpx.get(local(url, server)).status_code == 200
    poll(lambda: httpx.get(local(url, server)).status_code == 404, TTL_S * 6, "the image to expire")
    error = httpx.get(local(url, server)).json()["error"]
    assert "expired" in error["message"]
    assert not (storage / name).exists()


@pytest.mark.parametrize("quality, steps", [("low", 1), ("medium", 2), ("high", 4), ("hd", 4)])
def test_quality_means_the_documented_number_of_steps(server, quality, steps):
    """This server's default is 2 steps: low is half, medium the default, high and hd double."""
    by_quality = client(server).images.generate(
        prompt="a fox", size="64x64", quality=quality, response_format="b64_json", extra_body={"seed": 11}
    )
    by_steps = client(server).images.generate(
        prompt="a fox", size="64x64", response_format="b64_json", extra_body={"seed": 11, "num_inference_steps": steps}
    )
    assert np.array_equal(decode(by_quality.data[0].b64_json), decode(by_steps.data[0].b64_json))
    assert by_quality.quality == {"hd": "high"}.get(quality, quality)
