"""Workers encode their images where the pixels are made (issue 27): the engine gets the files a worker wrote
(final and partial images, in each request's output_format and output_compression) and opens them lazily, the
server sends them as they are, and workers that send pixels (an older gRPC worker) are still served."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from helpers import TESTS, ServerProcess, WorkerProcess, start_workers
from PIL import Image

from engine import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest, PartialImages
from workers.runtime.encoding import encode_pixels

pytestmark = pytest.mark.slow

# OpenAI's output_format and output_compression, and the format Pillow reads back.
FORMATS = [("png", None, "PNG"), ("jpeg", 20, "JPEG"), ("webp", 40, "WEBP")]


def request(seed: int, **fields) -> OmniDiffusionRequest:
    fields.setdefault("num_inference_steps", 2)
    return OmniDiffusionRequest("a red fox", 64, 64, seed=seed, **fields)


def file_format(data: bytes) -> str:
    return Image.open(io.BytesIO(data)).format


def same_request_as_pixels(engine: DiffusionEngine, sent: OmniDiffusionRequest):
    """The guide's collective_rpc("generate") of ``sent`` (pixels), on the rank that served it: the same call."""
    (output,) = engine.collective_rpc("generate", args=([sent],), unique_reply_rank=0)
    assert all(isinstance(image, np.ndarray) and image.dtype == np.uint8 for image in output.images)
    return output


# -- the engine over mp worker processes --------------------------------------------------------------------------
@pytest.mark.parametrize("scheduling", ["request", "step"])
def test_engine_gets_the_workers_files_opened_lazily_with_the_pixels_of_the_arrays_path(scheduling):
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", scheduling=scheduling)) as engine:
        assert engine.scheduling == scheduling
        sent = request(3, num_images=2)
        (served,) = engine.step([sent])
        # Opened, not decoded: the header is read, the pixels wait for their first reader.
        assert [image.fp is not None for image in served.images] == [True, True]
        assert [(f.format, f.width, f.height) for f in served.encoded] == [("png", 64, 64)] * 2
        assert [image.size for image in served.images] == [(64, 64)] * 2
        pixels = same_request_as_pixels(engine, sent).images
        # The same pipeline call on the same worker: PNG is lossless, so exactly the same pixels.
        assert all(np.array_equal(np.asarray(a), b) for a, b in zip(served.images, pixels, strict=True))

        partials: list[PartialImages] = []
        engine.progress_listeners.append(lambda item: isinstance(item, PartialImages) and partials.append(item))
        sent = request(5, num_inference_steps=6, partial_images=2, output_format="jpeg", output_compression=30)
        (served,) = engine.step([sent])
        served_partials, partials[:] = list(partials), []
        arrays = same_request_as_pixels(engine, sent)
        (pixels,) = arrays.images
    # output_compression is honoured: the file is the one Pillow writes from the same pixels at that quality.
    assert served.encoded[0].data == encode_pixels(pixels, "jpeg", 30).data
    assert served.usage == arrays.usage and served.usage.output_image_tokens > 0  # counted without pixels
    assert [p.index for p in served_partials] == [0, 1]
    assert [p.encoded for p in partials] == [[], []]  # the guide's generate: pixels
    for partial in served_partials:
        (encoded,) = partial.encoded
        assert (encoded.format, encoded.compression, file_format(encoded.data)) == ("jpeg", 30, "JPEG")
        assert partial.images[0].size == (64, 64)


# -- the server over mp --------------------------------------------------------------------------------------------
def test_server_answers_with_the_workers_files_in_each_format_encoded_once_per_request_by_the_worker(tiny_server):
    stage = {"stage": "image_encode"}
    before = tiny_server.metric("imagegen_request_stage_time_seconds_count", **stage)
    files = {}
    for output_format, compression, pillow_format in FORMATS:
        response = tiny_server.post(
            seed=11, n=2, num_inference_steps=2, output_format=output_format, output_compression=compression
        )
        assert response.status_code == 200, response.text
        assert response.json()["output_format"] == output_format
        files[output_format] = [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]
        assert [file_format(data) for data in files[output_format]] == [pillow_format] * 2
    pixels = [np.asarray(Image.open(io.BytesIO(data))) for data in files["png"]]
    for output_format, compression, _ in FORMATS[1:]:
        # The bytes Pillow writes from the same pixels at that compression: the request's output_compression.
        assert files[output_format] == [encode_pixels(p, output_format, compression).data for p in pixels]
    # The worker timed its encodes once per request (both images together); the server would have timed each image.
    assert tiny_server.metric("imagegen_request_stage_time_seconds_count", **stage) == before + len(FORMATS)


def test_streamed_partial_and_completed_images_come_in_the_requested_format(tiny_server):
    body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 6, "partial_images": 2, "stream": True,
            "seed": 4, "output_format": "webp", "output_compression": 50}

    with httpx.stream("POST", f"{tiny_server.base_url}/v1/images/generations", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data")]
    assert [e["type"].rsplit(".", 1)[1] for e in events] == ["partial_image", "partial_image", "completed"]
    assert all(file_format(base64.b64decode(e["b64_json"])) == "WEBP" for e in events)


# -- gRPC workers: one that encodes, one from before (contract version 1: sends pixels) ----------------------------
@pytest.fixture(scope="module")
def grpc_workers():
    (current,) = start_workers(1, "--model", "tiny")
    try:
        old = WorkerProcess(0, "--model", "tiny", program=(str(TESTS / "old_contract_worker.py"),))
    except BaseException:
        current.stop()
        raise
    yield current, old
    old.stop()
    current.stop()


def grpc_engine(worker: WorkerProcess) -> DiffusionEngine:
    return DiffusionEngine(
        OmniDiffusionConfig(model="tiny", distributed_executor_backend="grpc", worker_addresses=[worker.address])
    )


def test_grpc_worker_sends_its_files_and_an_older_one_pixels_with_the_same_images(grpc_workers):
    current, old = grpc_workers
    sent = request(8, num_inference_steps=4, partial_images=1, output_format="jpeg", output_compression=25)
    outputs, partials = {}, {}
    for name, worker in (("current", current), ("old", old)):
        with grpc_engine(worker) as engine:
            partials[name] = []
            engine.progress_listeners.append(
                lambda item, name=name: partials[name].append(item) if isinstance(item, PartialImages) else None
            )
            (outputs[name],) = engine.step([sent])
    assert outputs["current"].encoded[0].format == "jpeg" and partials["current"][0].encoded[0].format == "jpeg"
    assert outputs["old"].encoded == [] and partials["old"][0].encoded == []  # pixels: the server encodes them
    # The same request on two worker programs of the same build and settings: the same call, the same pixels.
    (old_pixels,) = [np.asarray(image) for image in outputs["old"].images]
    assert outputs["current"].encoded[0].data == encode_pixels(old_pixels, "jpeg", 25).data


def test_server_encodes_the_pixels_of_an_older_grpc_worker_as_asked(grpc_workers):
    current, old = grpc_workers
    answers = {}
    for name, worker in (("current", current), ("old", old)):
        server = ServerProcess("--model", "tiny", "--backend", "grpc", "--worker-addresses", worker.address)
        try:
            response = server.post(seed=9, num_inference_steps=2, output_format="jpeg", output_compression=35)
        finally:
            server.stop()
        assert response.status_code == 200, response.text
        answers[name] = base64.b64decode(response.json()["data"][0]["b64_json"])
    # The server writes what the worker would have: the same file either way.
    assert answers["old"] == answers["current"] and file_format(answers["old"]) == "JPEG"
