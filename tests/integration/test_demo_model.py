"""The demo model draws what the prompt says, end to end: the official client, the server, the
workers and the shipped weights. A broken text path, a swapped guidance sign or a wrong
scheduler turns these pictures back into noise and fails the colour floor."""

import base64
import io

import openai
import pytest
from helpers import ServerProcess
from PIL import Image

from workers.demo_scenes import accuracy, held_out_scenes

# Prompts the model never saw in training (see workers/demo_scenes.is_held_out).
SCENES = held_out_scenes(12)


@pytest.mark.slow
def test_the_demo_model_draws_the_colours_it_is_asked_for():
    server = ServerProcess("--model", "demo")
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        images = []
        for seed, scene in enumerate(SCENES):
            response = client.images.generate(
                model="demo", prompt=scene.caption(), size="64x64", response_format="b64_json", extra_body={"seed": seed}
            )
            images.append(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))))
    finally:
        server.stop()
    scores = accuracy(images, SCENES)
    assert scores["colour"] >= 0.8, scores
