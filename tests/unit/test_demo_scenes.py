"""The demo model's scene world: captions, held-out split and the pixel scorer the evaluation trusts."""

import numpy as np
import pytest
from demo_scenes import (
    FILLER_WORDS,
    SYNONYMS,
    VOCABULARY,
    accuracy,
    held_out_scenes,
    random_scene,
    render,
    training_scene,
)
from diffusers import DiffusionPipeline
from transformers import AutoTokenizer

from workers.models.catalog import DEMO_MODEL_PATH, resolve_model_path


@pytest.mark.parametrize("size", [64, 128])
def test_scorer_reads_the_scenes_it_renders(size):
    """The evaluation is only as good as its scorer: on exact renderings it must be (nearly) always right."""
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(300)]
    scores = accuracy([render(scene, rng, size) for scene in scenes], scenes)
    assert scores["colour"] == scores["background"] == 1.0
    assert scores["shape"] >= 0.97 and scores["count"] >= 0.97, scores


def test_scorer_tells_a_wrong_picture_from_a_right_one():
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng) for _ in range(100)]
    shuffled = [render(scene, rng) for scene in scenes[1:] + scenes[:1]]
    assert accuracy(shuffled, scenes)["colour"] < 0.5


def test_training_never_shows_a_held_out_combination():
    rng = np.random.default_rng(0)
    assert not any(training_scene(rng).is_held_out() for _ in range(3000))
    held_out = held_out_scenes(100)
    assert len(set(held_out)) == 100 and all(scene.is_held_out() for scene in held_out)
    assert held_out == held_out_scenes(100)


def test_captions_use_only_the_vocabulary():
    rng = np.random.default_rng(1)
    words = {word for _ in range(500) for word in random_scene(rng).caption(short_forms=rng).split()}
    assert words <= set(VOCABULARY)


def test_the_shipped_demo_model_is_complete_and_small():
    assert resolve_model_path("demo", DEMO_MODEL_PATH.parent) == DEMO_MODEL_PATH
    for name in ("model_index.json", "README.md", "samples.png"):
        assert (DEMO_MODEL_PATH / name).is_file(), name
    weights = sum(path.stat().st_size for path in DEMO_MODEL_PATH.rglob("*.safetensors"))
    assert 1e6 < weights < 10e6


def test_the_demo_tokenizer_spells_each_word_as_one_token():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_PATH / "tokenizer")
    for word in VOCABULARY:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end


def test_the_demo_tokenizer_maps_synonyms_and_drops_words_it_does_not_know():
    # As any diffusers client loads the folder: the rules live in tokenizer.json.
    tokenizer = DiffusionPipeline.from_pretrained(DEMO_MODEL_PATH).tokenizer

    def ids(text: str) -> list[int]:
        return tokenizer(text).input_ids

    assert ids("A big, shiny RED ball in the middle of a grey backdrop, please!") == ids(
        "a large red circle in the center a gray background"
    )
    assert ids("little violet squares at the upper left") == ids("small purple squares at the top left")
    assert ids("zebra, xylophone & quantum!") == ids("")  # nothing left: the unconditional prompt
    # Every synonym means a word of the vocabulary, and no filler word means anything.
    assert set(SYNONYMS.values()) <= set(VOCABULARY)
    assert all(ids(word) == ids("") for word in FILLER_WORDS)


def test_everyday_captions_normalize_to_the_canonical_caption():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_PATH / "tokenizer")
    rng = np.random.default_rng(5)
    for scene in held_out_scenes(50):
        everyday = scene.everyday_caption(rng)
        assert everyday != scene.caption()
        assert tokenizer(everyday).input_ids == tokenizer(scene.caption()).input_ids, everyday
