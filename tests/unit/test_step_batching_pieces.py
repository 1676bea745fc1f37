"""Pure pieces of step mode: which requests may share a running set, when partial images are taken, and when
the engine sends a request to a running set."""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.running_sets import RunningSetRoom
from workers.data import FINISHING_STEPS, LoraWeight, OmniDiffusionRequest
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


def fox(steps: int, images: int = 1) -> OmniDiffusionRequest:
    return OmniDiffusionRequest("a fox", num_inference_steps=steps, num_images=images)


def test_a_request_is_sent_where_it_would_run_at_once_earliest_deadline_first():
    room = RunningSetRoom(max_images=4, num_groups=1)
    long = fox(40, images=4)
    # Deadlines: arrival + steps + FINISHING_STEPS (the iterations a request sent ahead may wait for its room).
    room.place([long], [0])  # due at iteration 42: the running set is full
    assert room.choose([fox(4)], [0]) == (0, True)  # due at 6: it overtakes, the long one pauses
    for _ in range(38):
        room.iterated(0, ())
    assert room.choose([fox(4)], [0]) == (0, False)  # due at 44 now, after the long one: it would wait
    room.iterated(0, (long.request_id,))  # the long one's last step begins: its room frees
    assert room.choose([fox(4, images=4)], [0]) == (0, True)
    room.answered([long.request_id])
    assert room.choose([fox(4, images=9)], [0]) == (0, True)  # larger than the set: it goes when nothing is due


def test_a_request_goes_to_the_group_where_it_runs_at_once_and_pauses_the_least():
    room = RunningSetRoom(max_images=2, num_groups=3)
    room.place([fox(10, images=2)], [0])
    room.place([fox(2, images=2)], [1])
    room.place([fox(10)], [2])
    # Group 0 and 2 would run it at once (their requests are due later); group 2 runs fewer images.
    assert room.choose([fox(4)], [0, 1, 2]) == (2, True)
    assert room.choose([fox(4)], [0, 1]) == (0, True)
    assert room.choose([fox(4)], [1]) == (1, False)  # group 1's request is due first and fills it
    placed = fox(4)
    assert room.place([placed], [0, 1, 2]) == 2
    assert room.place([placed], [0, 1, 2]) == 2  # placed already (by the async front): it stays
    assert room.place([placed], [0, 1]) == 0  # its group was set aside since: placed anew


def test_requests_past_their_deadline_count_for_half_the_set_before_a_request_on_time():
    room = RunningSetRoom(max_images=4, num_groups=1)
    room.place([fox(2, images=4)], [0])  # due at iteration 2 + FINISHING_STEPS
    assert room.choose([fox(4)], [0]) == (0, False)
    room.iterated(0, ())
    room.iterated(0, ())
    # It could have had its steps by now, but it may have waited for the room it was sent ahead for: not late yet.
    assert room.choose([fox(4)], [0]) == (0, False)
    for _ in range(FINISHING_STEPS):
        room.iterated(0, ())  # paused for others: it is late now, and takes half of each call while others wait
    assert room.choose([fox(4)], [0]) == (0, True)
    assert room.choose([fox(4, images=3)], [0]) == (0, False)
