"""stream: true answers as server-sent events, as OpenAI does: partial images, then the completed image."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from helpers import decode
from PIL import Image

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("partial_images", [0, 1, 3])
def test_official_client_iterates_partial_then_completed_events(client, partial_images):
    events = list(
        client.images.generate(
            prompt="a fox",
            size="64x64",
            stream=True,
            partial_images=partial_images,
            extra_body={"seed": 2, "num_inference_steps": STEPS},
        )
    )
    assert [event.type for event in events] == ["image_generation.partial_image"] * partial_images + [
        "image_generation.completed"
    ]
    assert [event.partial_image_index for event in events[:-1]] == list(range(partial_images))
    completed = events[-1]
    assert (completed.size, completed.output_format, completed.background) == ("64x64", "png", "opaque")
    assert completed.usage.output_tokens > 0 and completed.usage.input_tokens_details.text_tokens > 0
    # The completed image is the one a plain request makes; partials are earlier, different decodes.
    plain = client.images.generate(prompt="a fox", size="64x64", extra_body={"seed": 2, "num_inference_steps": STEPS})
    final = decode(completed.b64_json)
    assert np.array_equal(final, decode(plain.data[0].b64_json))
    distances = [np.abs(decode(event.b64_json) - final).mean() for event in events[:-1]]
    # Later partials come closer to the final image (the tiny model's random VAE keeps them close anyway).
    assert all(distance > 0 for distance in distances)
    assert distances == sorted(distances, reverse=True)


def test_async_client_streams_edits_as_image_edit_events(tiny_server):
    async def stream():
        client = openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
        events = await client.images.edit(
            image=("in.png", png(), "image/png"),
            prompt="a fox",
            stream=True,
            partial_images=2,
            output_format="jpeg",
            extra_body={"seed": 1, "num_inference_steps": STEPS, "strength": 1.0},
        )
        return [event async for event in events]

    events = asyncio.run(stream())
    assert [event.type for event in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert all(base64.b64decode(event.b64_json).startswith(b"\xff\xd8") for event in events)
    assert events[-1].usage.input_tokens_details.image_tokens > 0


def test_wire_format_is_named_sse_events_with_openai_fields(tiny_server):
    body = {
        "prompt": "a fox",
        "size": "64x64",
        "stream": True,
        "partial_images": 2,
        "num_inference_steps": STEPS,
        "seed": 4,
    }
    with httpx.stream("POST", f"{tiny_server.base_url}/v1/images/generations", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    blocks = [block for block in text.split("\n\n") if block]
    assert len(blocks) == 3
    for block, index in zip(blocks, (0, 1, None)):
        event_line, data_line = block.split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {data['type']}"
        assert {"b64_json", "created_at", "size", "quality", "background", "output_format", "type"} <= set(data)
        assert data.get("partial_image_index") == index
    assert json.loads(blocks[-1].split("\n")[1].removeprefix("data: "))["seed"] == 4


def test_n_images_stream_one_completed_event_each(client):
    events = list(
        client.images.generate(
            prompt="a fox",
            size="64x64",
            n=2,
            stream=True,
            partial_images=1,
            extra_body={"seed": [5, 9], "num_inference_steps": STEPS},
        )
    )
    # Both images' partial image is decoded in one step, before either image is complete.
    assert [event.type.rsplit(".", 1)[1] for event in events] == ["partial_image"] * 2 + ["completed"] * 2
    assert [event.model_extra["seed"] for event in events if event.type.endswith("completed")] == [5, 9]


@pytest.mark.parametrize("partial_images", [-1, 4])
def test_partial_images_out_of_range_is_400_before_streaming(client, partial_images):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a fox", size="64x64", stream=True, partial_images=partial_images)
    assert caught.value.body["param"] == "partial_images"
