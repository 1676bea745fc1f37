"""Partial images are live: each reaches its client as soon as a worker has decoded it, while the
request is still denoised, on the mp, ray and grpc backends."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from helpers import decode, poll

from engine import OmniDiffusionRequest

pytestmark = pytest.mark.slow

# Many seconds of denoising on a CPU after the first partial image (taken after step 150 // 4).
LONG_STREAM = {
    "prompt": "a red fox",
    "size": "128x128",
    "num_inference_steps": 150,
    "partial_images": 3,
    "stream": True,
    "seed": 1,
}


def requests(steps: int, partial_images: int, images: tuple[int, ...]) -> list[OmniDiffusionRequest]:
    return [
        OmniDiffusionRequest(
            "a red fox", 64, 64, num_inference_steps=steps, seed=seed, num_images=n, partial_images=partial_images
        )
        for seed, n in enumerate(images)
    ]


def test_worker_hands_a_partial_image_to_its_sink_while_it_denoises(tiny_worker):
    """The sink cancels the request when it gets the first partial image: the pipeline call stops at
    the next step, which it can only do if the sink was called before the denoising ended."""
    (request,) = requests(steps=12, partial_images=3, images=(1,))
    received = []

    def sink(partial):
        received.append(partial)
        tiny_worker.cancel([partial.request_id])

    tiny_worker.progress_sink = sink
    try:
        (output,) = tiny_worker.generate([request])
    finally:
        tiny_worker.progress_sink = None
    assert [(partial.request_id, partial.index) for partial in received] == [(request.request_id, 0)]
    assert output.images == [] and "cancelled" in output.error


def test_without_a_sink_the_same_partial_images_come_with_the_reply(tiny_worker):
    batch = requests(steps=8, partial_images=2, images=(2, 1))
    streamed = []
    tiny_worker.progress_sink = streamed.append
    try:
        live = tiny_worker.generate(batch)
    finally:
        tiny_worker.progress_sink = None
    late = tiny_worker.generate(batch)
    # Live: each step's partial images, request by request, and none left for the reply.
    assert [(p.request_id, p.index, len(p.images)) for p in streamed] == [
        (batch[0].request_id, 0, 2),
        (batch[1].request_id, 0, 1),
        (batch[0].request_id, 1, 2),
        (batch[1].request_id, 1, 1),
    ]
    assert [output.partial_images for output in live] == [[], []]
    # Without a sink: the same partial images, in each request's reply.
    returned = [partial for output in late for partial in output.partial_images]
    assert sorted((p.request_id, p.index) for p in returned) == sorted((p.request_id, p.index) for p in streamed)
    by_key = {(p.request_id, p.index): p.images for p in streamed}
    for partial in returned:
        assert all(np.array_equal(a, b) for a, b in zip(partial.images, by_key[partial.request_id, partial.index]))


def first_event(lines) -> dict:
    """The data of the first server-sent event."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without an event")


def test_first_partial_image_reaches_the_client_while_the_request_still_denoises(streaming_server):
    """Proof by causality, not timing: the client reads the first partial_image event and hangs up.

    Were partial images sent with the finished image (as they once were), the step would have
    ended before the event could be read, and counted its image in imagegen_images_generated_total.
    Instead the request is counted as cancelled, and its step ends with no image: the event left
    the server while the worker was still denoising. (The test could only fail, never pass wrongly,
    if the many remaining steps ran out before the hang-up reached the worker.)
    """
    generated = streaming_server.metric("imagegen_images_generated_total")
    cancelled = streaming_server.metric("imagegen_requests_cancelled_total")
    url = f"{streaming_server.base_url}/v1/images/generations"
    with httpx.stream("POST", url, json=LONG_STREAM, timeout=120) as response:
        assert response.status_code == 200
        event = first_event(response.iter_lines())
    assert (event["type"], event["partial_image_index"]) == ("image_generation.partial_image", 0)
    assert decode(event["b64_json"]).shape == (128, 128, 3)
    poll(lambda: streaming_server.metric("imagegen_num_requests_running") == 0, 60, "the step to stop")
    assert streaming_server.metric("imagegen_requests_cancelled_total") == cancelled + 1
    assert streaming_server.metric("imagegen_images_generated_total") == generated


def test_streams_every_partial_image_then_the_completed_image(streaming_server):
    body = {**LONG_STREAM, "size": "64x64", "num_inference_steps": 8, "n": 2, "seed": [3, 4]}
    with httpx.stream("POST", f"{streaming_server.base_url}/v1/images/generations", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data")]
    # Both images' partial image k are decoded in one pipeline step, and the completed images come last.
    assert [(e["type"].rsplit(".", 1)[1], e.get("partial_image_index")) for e in events] == [
        ("partial_image", 0),
        ("partial_image", 0),
        ("partial_image", 1),
        ("partial_image", 1),
        ("partial_image", 2),
        ("partial_image", 2),
        ("completed", None),
        ("completed", None),
    ]
    assert [e["seed"] for e in events[-2:]] == [3, 4]
