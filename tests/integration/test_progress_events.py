"""The opt-in progress event (``progress: true`` with ``stream``): one per denoising step, made by the
worker while it denoises and carried live by the mp pipe and Ray's streaming generator."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import openai
import pytest
from helpers import poll
from PIL import Image

from engine import OmniDiffusionRequest
from workers.data import PartialImageOutput, StepProgress

pytestmark = pytest.mark.slow

# Many seconds of denoising on a CPU after the first step.
LONG_STREAM = {
    "prompt": "a red fox",
    "size": "128x128",
    "num_inference_steps": 150,
    "stream": True,
    "progress": True,
    "seed": 1,
}


def test_worker_hands_a_step_progress_per_step_only_to_requests_that_asked(tiny_worker):
    asked, silent = [
        OmniDiffusionRequest("a red fox", 64, 64, num_inference_steps=5, seed=seed, progress=progress, partial_images=1)
        for seed, progress in ((1, True), (2, False))
    ]
    received = []
    tiny_worker.progress_sink = received.append
    try:
        outputs = tiny_worker.generate([asked, silent])
    finally:
        tiny_worker.progress_sink = None
    assert [o.error for o in outputs] == [None, None]
    steps = [p for p in received if isinstance(p, StepProgress)]
    assert steps == [StepProgress(asked.request_id, step, 5) for step in range(1, 6)]
    # Partial images still come for both, in the same sink, after the step they were taken at.
    partials = [(index, p.request_id) for index, p in enumerate(received) if isinstance(p, PartialImageOutput)]
    assert [request_id for _, request_id in partials] == [asked.request_id, silent.request_id]
    assert received.index(StepProgress(asked.request_id, 2, 5)) < partials[0][0]
    # Without a sink the reply carries only the partial images: steps reported late would tell nothing.
    (late,) = tiny_worker.generate([asked])
    assert [type(p) for p in late.partial_images] == [PartialImageOutput]


def test_official_client_passes_progress_events_through(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    events = list(
        client.images.generate(
            prompt="a fox",
            size="64x64",
            stream=True,
            partial_images=1,
            extra_body={"progress": True, "num_inference_steps": 4, "seed": 3},
        )
    )
    # The partial image is taken after step 2 of 4; the SDK hands every event over without raising.
    assert [event.type for event in events] == [
        "image_generation.progress",
        "image_generation.progress",
        "image_generation.partial_image",
        "image_generation.progress",
        "image_generation.progress",
        "image_generation.completed",
    ]
    progress = [event for event in events if event.type.endswith(".progress")]
    assert [(event.model_extra["step"], event.model_extra["total_steps"]) for event in progress] == [
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
    ]
    assert events[-1].model_extra["seed"] == 3


def test_without_progress_or_without_stream_there_are_no_progress_events(tiny_server):
    url = f"{tiny_server.base_url}/v1/images/generations"
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 4, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        types = [json.loads(line[6:])["type"] for line in response.iter_lines() if line.startswith("data: ")]
    assert types == ["image_generation.completed"]
    plain = httpx.post(url, json={**body, "stream": False, "progress": True}, timeout=120)
    assert plain.status_code == 200 and len(plain.json()["data"]) == 1


def test_an_edit_counts_the_steps_its_strength_leaves(tiny_server):
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, "PNG")
    form = {"prompt": "a fox", "num_inference_steps": "8", "strength": "0.5", "stream": "true", "progress": "true"}
    with httpx.stream(
        "POST",
        f"{tiny_server.base_url}/v1/images/edits",
        data=form,
        files={"image": ("in.png", buffer.getvalue(), "image/png")},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [(e["type"], e.get("step"), e.get("total_steps")) for e in events] == [
        *[("image_edit.progress", step, 4) for step in range(1, 5)],
        ("image_edit.completed", None, None),
    ]


def test_first_progress_event_reaches_the_client_while_the_request_still_denoises(streaming_server):
    """Proof by causality, not timing (as for partial images): the client reads the first progress
    event and hangs up. Had the steps been reported with the finished image, the step would have
    ended and counted its image; instead the request is cancelled and its step makes no image."""
    generated = streaming_server.metric("imagegen_images_generated_total")
    cancelled = streaming_server.metric("imagegen_requests_cancelled_total")
    url = f"{streaming_server.base_url}/v1/images/generations"
    with httpx.stream("POST", url, json=LONG_STREAM, timeout=120) as response:
        assert response.status_code == 200
        first = next(json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: "))
    assert (first["type"], first["step"], first["total_steps"]) == ("image_generation.progress", 1, 150)
    poll(lambda: streaming_server.metric("imagegen_num_requests_running") == 0, 60, "the step to stop")
    assert streaming_server.metric("imagegen_requests_cancelled_total") == cancelled + 1
    assert streaming_server.metric("imagegen_images_generated_total") == generated


def test_every_step_comes_once_in_order_on_each_backend(streaming_server):
    body = {**LONG_STREAM, "size": "64x64", "num_inference_steps": 6, "n": 2, "partial_images": 2}
    with httpx.stream("POST", f"{streaming_server.base_url}/v1/images/generations", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    # One progress event per step for the request (not per image); partial images after steps 2 and 4.
    assert [(e["type"].rsplit(".", 1)[1], e.get("step", e.get("partial_image_index"))) for e in events] == [
        ("progress", 1),
        ("progress", 2),
        ("partial_image", 0),
        ("partial_image", 0),
        ("progress", 3),
        ("progress", 4),
        ("partial_image", 1),
        ("partial_image", 1),
        ("progress", 5),
        ("progress", 6),
        ("completed", None),
        ("completed", None),
    ]
