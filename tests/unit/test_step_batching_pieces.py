"""Pure pieces of step mode: which requests may share a running set, and when partial images are taken."""

from __future__ import annotations

import dataclasses

import numpy as np

from workers.data import LoraWeight, OmniDiffusionRequest
from workers.runtime.step_batching import request_refusal
from workers.worker import partial_image_steps


def test_the_step_key_leaves_out_step_counts_and_partial_images_and_the_batch_key_keeps_them():
    base = OmniDiffusionRequest("a fox", height=64, width=64, num_inference_steps=4, guidance_scale=5.0)
    longer = dataclasses.replace(base, num_inference_steps=40, partial_images=2)
    assert base.step_key() == longer.step_key()
    assert base.batch_key() != longer.batch_key()
    for other in (
        dataclasses.replace(base, height=32),
        dataclasses.replace(base, guidance_scale=7.5),
        dataclasses.replace(base, negative_prompt="blurry"),
        dataclasses.replace(base, cache=False),
        dataclasses.replace(base, loras=(LoraWeight("sharp"),)),
        dataclasses.replace(base, loras=(LoraWeight("sharp"), LoraWeight("pastel"))),
    ):
        assert other.step_key() != base.step_key(), other


def test_edits_and_inpainting_are_refused_a_running_set():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    assert request_refusal(OmniDiffusionRequest("a fox")) is None
    assert "img2img" in request_refusal(OmniDiffusionRequest("a fox", images=[image]))
    mask = np.zeros((64, 64), dtype=np.uint8)
    assert "inpaint" in request_refusal(OmniDiffusionRequest("a fox", images=[image], mask=mask))


def test_partial_images_are_evenly_spaced_and_never_the_last_step():
    assert partial_image_steps(3, 8) == [2, 4, 6]
    assert partial_image_steps(2, 3) == [1, 2]
    assert partial_image_steps(3, 2) == [1]  # fewer steps than partial images asked for
