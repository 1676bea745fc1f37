"""The demo model draws what the prompt says, end to end: the official client, the server, the
workers and the shipped weights. A broken text path, a swapped guidance sign or a wrong
scheduler turns these pictures back into noise and fails the colour floor."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from helpers import ServerProcess
from PIL import Image

from demo_scenes import BACKGROUNDS, SYNONYMS, accuracy, held_out_scenes, score

pytestmark = pytest.mark.slow

# Prompts the model never saw in training (see scripts/demo_scenes.py, Scene.is_held_out).
SCENES = held_out_scenes(20)


@pytest.fixture(scope="module")
def client():
    server = ServerProcess("--model", "demo")
    yield openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    server.stop()


def draw(client: openai.OpenAI, prompts: list[str]) -> list[Image.Image]:
    """Prompt i with seed i, sent at once so that the server batches them (the scores do not depend
    on the batch). No step count: the model's own default (30, from its imagegen.json)."""

    def one(seed: int, prompt: str) -> Image.Image:
        response = client.images.generate(
            model="demo", prompt=prompt, size="64x64", response_format="b64_json", extra_body={"seed": seed}
        )
        return Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(len(prompts)), prompts))


def test_the_demo_model_draws_the_colours_it_is_asked_for(client):
    scores = accuracy(draw(client, [scene.caption() for scene in SCENES[:12]]), SCENES[:12])
    assert scores["colour"] >= 0.8, scores


def test_everyday_words_synonyms_and_unknown_words_keep_the_colours_and_backgrounds(client):
    """As a newcomer types: synonyms the issue listed (big, grey, middle, ...) and others (huge,
    backdrop, ball, ...), words the model never learned, capitals and punctuation."""
    rng = np.random.default_rng(11)
    prompts = [scene.everyday_caption(rng) for scene in SCENES]
    listed = {"big", "little", "tiny", "centre", "middle", "grey", "violet"}
    used = {word.strip(",.!").lower() for prompt in prompts for word in prompt.split()}
    assert used & listed and used & (set(SYNONYMS) - listed), prompts  # both kinds are in the test
    scores = accuracy(draw(client, prompts), SCENES)
    assert scores["colour"] >= 0.9 and scores["background"] == 1.0, (scores, prompts)


def test_a_prompt_of_only_unknown_words_draws_shapes_on_a_background(client):
    prompts = ["zebra xylophone quantum", "Bonjour, le monde!", "lorem ipsum dolor sit amet"]
    for prompt, image in zip(prompts, draw(client, prompts)):
        drawn = score(image)
        assert drawn.background in BACKGROUNDS and drawn.count >= 1, (prompt, drawn)
