"""Pure pieces of the OpenAI layer: the image store, upload decoding, masks, quality, settings, retry headers."""

from __future__ import annotations

import asyncio
import io
import os
import time

import httpx2
import numpy as np
import openai
import pytest
from fastapi import FastAPI
from PIL import Image

from helpers import png_claiming

from engine import GenerationFailedError, InvalidRequestError, NotFoundError, OmniDiffusionConfig, steps_for_quality
from engine.images import decode_upload, mask_pixels, resize_pixels
from server.cli import build_parser
from server.errors import install_error_handlers
from server.storage import ImageStore


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# -- the image store ---------------------------------------------------------------------------


def test_store_round_trip_with_random_ids_and_media_type(tmp_path):
    store = ImageStore(tmp_path, ttl_s=60)
    first, second = store.save(b"one", "png"), store.save(b"two", "webp")
    assert first != second and len(first) == len("x" * 43 + ".png")
    assert store.read(first) == (b"one", "image/png")
    assert store.read(second) == (b"two", "image/webp")


@pytest.mark.parametrize("file_id", ["../secret.png", "..", "a/b.png", "x" * 43 + ".gif", "x" * 42 + ".png", ""])
def test_store_refuses_ids_of_another_shape(tmp_path, file_id):
    (tmp_path / "secret.png").write_bytes(b"secret")
    store = ImageStore(tmp_path / "images", ttl_s=60)
    with pytest.raises(NotFoundError):
        store.read(file_id)


def test_store_expires_files_after_ttl(tmp_path):
    store = ImageStore(tmp_path, ttl_s=60)
    file_id = store.save(b"data", "png")
    # Age the file instead of waiting for it.
    old = time.time() - 61
    os.utime(tmp_path / file_id, (old, old))
    with pytest.raises(NotFoundError, match="expired"):
        store.read(file_id)
    assert not (tmp_path / file_id).exists()


def test_store_sweeps_expired_files_when_saving(tmp_path):
    store = ImageStore(tmp_path, ttl_s=10)
    stale = store.save(b"old", "png")
    old = time.time() - 11
    os.utime(tmp_path / stale, (old, old))
    store._last_sweep = old  # the last sweep was a TTL ago, so the next save sweeps
    fresh = store.save(b"new", "png")
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh]


def test_store_without_folder_makes_and_removes_a_private_one():
    store = ImageStore(None, ttl_s=60)
    store.save(b"x", "png")
    assert store.folder.is_dir() and oct(store.folder.stat().st_mode & 0o777) == "0o700"
    store.close()
    store.close()
    assert not store.folder.exists()


# -- uploads -------------------------------------------------------------------------------------


def test_decode_upload_accepts_png_jpeg_webp():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    for fmt in ("PNG", "JPEG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        assert decode_upload(buffer.getvalue(), "image", 10_000).size == (40, 30)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not an image at all", "could not be read"),
        (png_bytes(Image.effect_noise((64, 64), 50))[:2000], "truncated or corrupt"),
        (b"GIF89a" + b"\0" * 100, "could not be read"),
        (png_claiming(5000, 5000), "pixels; the limit is"),
        (png_claiming(100_000, 100_000), "too many pixels"),
    ],
    ids=["text", "truncated", "gif", "over-limit", "bomb"],
)
def test_decode_upload_refuses_bad_files_naming_the_param(data, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        decode_upload(data, "mask", max_pixels=4096 * 4096)
    assert caught.value.param == "mask"


def test_mask_transparent_pixels_become_the_area_to_repaint():
    rgba = np.full((4, 6, 4), 255, np.uint8)
    rgba[:, 3:, 3] = 0
    mask = mask_pixels(Image.fromarray(rgba, "RGBA"))
    assert mask.shape == (4, 6)
    assert (mask[:, 3:] == 255).all() and (mask[:, :3] == 0).all()


def test_mask_without_alpha_is_refused():
    with pytest.raises(InvalidRequestError, match="no alpha channel"):
        mask_pixels(Image.new("RGB", (4, 4)))


def test_resized_mask_stays_binary():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, 5:] = 255
    assert set(np.unique(resize_pixels(mask, 64, 32))) == {0, 255}
    assert resize_pixels(mask, 10, 10) is mask


# -- settings and mappings -----------------------------------------------------------------------


def test_quality_maps_to_documented_steps():
    steps = {
        quality: steps_for_quality(quality, default_steps=20, max_steps=50)
        for quality in ("low", "medium", "auto", "standard", "high", "hd", "max")
    }
    assert steps == {"low": 10, "medium": 20, "auto": 20, "standard": 20, "high": 40, "hd": 40, "max": 50}


def test_api_keys_from_flag_and_environment(monkeypatch):
    args = build_parser().parse_args(["serve", "--api-key", "k1, k2", "--default-response-format", "url"])
    config = OmniDiffusionConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    assert config.api_key == ["k1", "k2"]
    assert config.default_response_format == "url"
    assert "k1" not in repr(config)
    monkeypatch.setenv("IMAGEGEN_API_KEY", "secret")
    assert OmniDiffusionConfig().api_key == ["secret"]


def test_openai_defaults():
    config = OmniDiffusionConfig()
    assert config.api_key is None and config.metrics_require_api_key is False
    assert (config.default_response_format, config.image_ttl_s) == ("b64_json", 3600)


def test_deterministic_failure_tells_the_official_client_not_to_retry():
    """The error table marks a pipeline failure x-should-retry: false, and the official client obeys it."""
    app = FastAPI()
    install_error_handlers(app)
    calls = []

    @app.post("/v1/images/generations")
    async def fail():
        calls.append(1)
        raise GenerationFailedError("out of memory at this size")

    async def generate() -> openai.InternalServerError:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as http_client:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=2, http_client=http_client)
            with pytest.raises(openai.InternalServerError) as caught:
                await client.images.generate(prompt="a fox")
        return caught.value

    error = asyncio.run(generate())
    assert error.response.headers["x-should-retry"] == "false"
    assert len(calls) == 1


def _request(headers: dict[str, str] | None = None, state: dict | None = None, client=("10.0.0.7", 5555)):
    from starlette.requests import Request

    raw = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    return Request({"type": "http", "headers": raw, "client": client, "state": dict(state or {})})


def test_fairness_key_is_the_header_then_the_api_key_digest_then_the_client_address():
    from server.serving import fairness_key

    keyed = {"api_key_digest": "abc123"}
    user = {"X-Forwarded-User": "alice"}
    assert fairness_key(_request(), None) == "client:10.0.0.7"
    assert fairness_key(_request(state=keyed), None) == "key:abc123"
    # The header counts only when the setting names it, and then before the API key.
    assert fairness_key(_request(user, keyed), None) == "key:abc123"
    by_header = fairness_key(_request(user, keyed), "X-Forwarded-User")
    assert by_header.startswith("header:") and "alice" not in by_header
    assert by_header != fairness_key(_request({"X-Forwarded-User": "bob"}), "X-Forwarded-User")
    assert fairness_key(_request(state=keyed), "X-Forwarded-User") == "key:abc123"  # no header sent


def test_api_key_middleware_hands_on_a_digest_of_the_matching_key_never_the_key():
    from server.middleware import ApiKeyMiddleware, key_digest

    seen = {}

    async def app(scope, receive, send):
        seen.update(scope["state"])

    middleware = ApiKeyMiddleware(
        app, ["key-one", "key-two"], protect_metrics=False, has_own_key=lambda method, path: False
    )
    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "headers": [(b"authorization", b"Bearer key-two")]}
    asyncio.run(middleware(scope, None, None))
    assert seen["api_key_digest"] == key_digest(b"key-two") != key_digest(b"key-one")
    assert "key-two" not in seen["api_key_digest"]


def test_duration_text_is_written_as_openai_writes_its_reset_headers():
    from server.serving import duration_text

    texts = [duration_text(s) for s in (0, 0.25, 0.9999, 1, 1.5, 123.4)]
    assert texts == ["0ms", "250ms", "1s", "1s", "1.5s", "2m3.4s"]


def test_queued_images_per_key_defaults_to_a_quarter_of_the_queue():
    assert OmniDiffusionConfig(max_queue_size=100).queued_images_per_key == 25
    assert OmniDiffusionConfig(max_queue_size=2).queued_images_per_key == 1
    assert OmniDiffusionConfig(max_queue_size=100, max_queued_images_per_key=7).queued_images_per_key == 7
