"""LoRA adapters through a real server and the official openai client: start-up adapters picked with
``model``, scales, concurrent adapters, 404s, edits and streams, run-time load and unload behind the
admin key, path confinement, and the switch that is off by default."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading

import httpx
import numpy as np
import openai
import pytest
from helpers import ADMIN_KEY, ServerProcess, admin, assert_pixels_close, decode, poll, run_cli
from lora_adapters import make_kohya_lora, make_lora
from PIL import Image

pytestmark = pytest.mark.slow

USER_KEY = "lora-user-key"
STEPS = {"num_inference_steps": 3}


@pytest.fixture(scope="module")
def lora_dir(model_cache, tmp_path_factory):
    """--lora-dir with three adapters (two diffusers folders, one kohya file) and a file that is no LoRA;
    beside it, outside, one more adapter."""
    from safetensors.torch import save_file
    import torch

    root = tmp_path_factory.mktemp("loras")
    folder = root / "dir"
    make_lora(folder / "sharp", model_cache, seed=1)
    make_lora(folder / "pastel", model_cache, seed=2)
    make_kohya_lora(folder / "kohya.safetensors", model_cache, seed=3)
    save_file({"some.weight": torch.zeros(4, 4)}, folder / "not-a-lora.safetensors")
    make_lora(root / "outside", model_cache, seed=4)
    return folder


@pytest.fixture(scope="module")
def server(lora_dir):
    server = ServerProcess(
        "--model", "tiny",
        "--lora-modules", f"sharp={lora_dir / 'sharp'}", f"pastel={lora_dir / 'pastel'}:0.7",
        f"kohya={lora_dir / 'kohya.safetensors'}",
        "--lora-dir", str(lora_dir), "--allow-runtime-lora", "--api-key", USER_KEY,
        "--max-num-inference-steps", "1000", "--batch-timeout-ms", "50", "--max-loras-per-request", "2",
        env={"IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY},
    )
    yield server
    server.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=USER_KEY, max_retries=0)


def generate(client, model: str = "tiny", seed: int = 5, **extra) -> np.ndarray:
    response = client.images.generate(model=model, prompt="a red fox", size="64x64", extra_body={"seed": seed, **STEPS, **extra})
    return decode(response.data[0].b64_json)


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_models_lists_each_adapter_with_the_base_model_as_parent(client):
    models = {model.id: model for model in client.models.list().data}
    assert list(models) == ["tiny", "sharp", "pastel", "kohya"]
    assert models["tiny"].model_extra.get("parent") is None
    assert {models[name].model_extra["parent"] for name in ("sharp", "pastel", "kohya")} == {"tiny"}
    assert client.models.retrieve("pastel").model_extra["parent"] == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("blurry")
    assert caught.value.body["code"] == "model_not_found"


def test_an_adapter_changes_the_pixels_and_scale_zero_is_the_base(client):
    base = generate(client)
    for adapter in ("sharp", "pastel", "kohya"):
        assert np.abs(generate(client, adapter) - base).max() > 8, adapter
    assert np.abs(generate(client, "sharp") - generate(client, "pastel")).max() > 8
    # The same request replayed alone is the same computation: bit for bit.
    assert np.array_equal(generate(client, "sharp", lora_scale=0.0), base)
    assert np.array_equal(generate(client, "sharp"), generate(client, "sharp"))
    # pastel's default scale (0.7, from --lora-modules) is what it runs at when a request names none.
    assert np.array_equal(generate(client, "pastel"), generate(client, "pastel", lora_scale=0.7))
    assert np.abs(generate(client, "pastel", lora_scale=1.0) - generate(client, "pastel")).max() > 0
    # After adapter requests, the base model's pixels are what they were.
    assert np.array_equal(generate(client), base)


def test_concurrent_requests_for_different_adapters_each_get_their_own(client, server):
    wanted = [("tiny", 11), ("sharp", 12), ("pastel", 13), ("sharp", 14), ("kohya", 15), ("tiny", 16)]
    alone = {(model, seed): generate(client, model, seed) for model, seed in wanted}
    steps_before = server.metric("imagegen_batch_size_images_count")
    with concurrent.futures.ThreadPoolExecutor(len(wanted)) as pool:
        together = dict(zip(wanted, pool.map(lambda job: generate(client, *job), wanted)))
    for job in wanted:
        assert_pixels_close(together[job], alone[job])
    # Four adapters (the base counting as one) cannot share fewer than four pipeline calls.
    assert server.metric("imagegen_batch_size_images_count") - steps_before >= 4
    assert server.metric("imagegen_lora_requests_total", lora_name="sharp") >= 4


def test_an_unknown_model_is_404_model_not_found_on_every_image_route(client, server):
    calls = {
        "generations": lambda: client.images.generate(model="blurry", prompt="a fox", size="64x64"),
        "edits": lambda: client.images.edit(model="blurry", image=("a.png", png(), "image/png"), prompt="a fox"),
        "variations": lambda: client.images.create_variation(model="blurry", image=("a.png", png(), "image/png")),
    }
    for route, call in calls.items():
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["code"] == "model_not_found", route
        assert caught.value.body["param"] == "model", route
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client, "tiny", lora_scale=0.5)
    assert caught.value.body["param"] == "lora_scale"


def test_two_adapters_together_differ_from_each_alone_and_the_base_is_unchanged_after(client):
    base = generate(client)
    sharp, pastel = generate(client, loras=[{"name": "sharp"}]), generate(client, loras=[{"name": "pastel"}])
    both = generate(client, loras=[{"name": "sharp", "scale": 1.0}, {"name": "pastel", "scale": 0.7}])
    for alone in (sharp, pastel, base):
        assert np.abs(both - alone).max() > 8
    # One adapter in loras is model=<adapter>'s computation, at the adapter's own scale: bit for bit.
    assert np.array_equal(sharp, generate(client, "sharp"))
    assert np.array_equal(pastel, generate(client, "pastel", lora_scale=0.7))
    assert np.array_equal(generate(client, loras=[{"name": "sharp", "scale": 0}, {"name": "pastel", "scale": 0}]), base)
    assert np.array_equal(generate(client), base)


def test_the_order_adapters_are_written_in_changes_no_pixel(client):
    written = [{"name": "sharp", "scale": 0.6}, {"name": "kohya", "scale": 1.3}]
    assert np.array_equal(generate(client, loras=written), generate(client, loras=written[::-1]))


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"loras": [{"name": "sharp"}, {"name": "blurry"}]}, 404, "loras", "LoRA adapter 'blurry' does not exist"),
        ({"model": "sharp", "loras": [{"name": "pastel"}]}, 400, "loras", "name them all in loras"),
        ({"model": "sharp", "loras": [{"name": "sharp"}]}, 400, "loras", "name them all in loras"),
        ({"loras": [{"name": "sharp"}], "lora_scale": 0.5}, 400, "lora_scale", "give each adapter its scale"),
        ({"loras": [{"name": "sharp"}, {"name": "pastel"}, {"name": "kohya"}]}, 400, "loras", "the limit is 2"),
        ({"loras": [{"name": "sharp"}, {"name": "sharp", "scale": 0.5}]}, 400, "loras", "named twice"),
        ({"loras": [{"name": "sharp", "scale": 11}]}, 400, "loras", "between -10 and 10"),
        ({"loras": [{"name": "sharp", "weight": 1}]}, 400, "loras", ""),
        ({"loras": "sharp"}, 400, "loras", ""),
    ],
)
def test_bad_loras_are_openai_errors_naming_the_param(server, body, status, param, words):
    response = server.post(headers={"Authorization": f"Bearer {USER_KEY}"}, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_edits_take_loras_as_json_and_as_multipart_json_text(server):
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    loras = [{"name": "pastel"}, {"name": "sharp", "scale": 0.8}]
    fields = {"prompt": "a fox", "seed": 3, **STEPS}

    def multipart(**extra) -> np.ndarray:
        response = httpx.post(
            f"{server.base_url}/v1/images/edits", files={"image": ("a.png", png(1), "image/png")},
            data={**fields, **extra}, headers=headers, timeout=120,
        )
        assert response.status_code == 200, response.text
        return decode(response.json()["data"][0]["b64_json"])

    data_url = "data:image/png;base64," + base64.b64encode(png(1)).decode()
    as_json = httpx.post(
        f"{server.base_url}/v1/images/edits", headers=headers, timeout=120,
        json={**fields, "loras": loras, "images": [{"image_url": data_url}]},
    )
    assert as_json.status_code == 200, as_json.text
    with_loras = multipart(loras=json.dumps(loras))
    assert np.array_equal(decode(as_json.json()["data"][0]["b64_json"]), with_loras)
    assert np.abs(with_loras - multipart()).max() > 8


def test_edits_variations_and_streams_run_with_the_adapter(client):
    def edit(model):
        response = client.images.edit(
            model=model, image=("a.png", png(1), "image/png"), prompt="a fox", extra_body={"seed": 3, **STEPS}
        )
        return decode(response.data[0].b64_json)

    assert np.abs(edit("sharp") - edit("tiny")).max() > 8
    def variation(model):
        response = client.images.create_variation(
            model=model, image=("a.png", png(2), "image/png"), extra_body={"seed": 4, **STEPS}
        )
        return decode(response.data[0].b64_json)

    assert np.abs(variation("kohya") - variation("tiny")).max() > 8
    events = list(
        client.images.generate(
            model="sharp", prompt="a red fox", size="64x64", stream=True, partial_images=1, extra_body={"seed": 5, **STEPS}
        )
    )
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert_pixels_close(decode(events[-1].b64_json), generate(client, "sharp"))


def test_runtime_load_then_unload(client, server, lora_dir):
    base = generate(client)
    # A relative path is taken from --lora-dir; the same weights as the start-up sharp adapter.
    loaded = admin(server, "load_lora_adapter", lora_name="fresh", lora_path="sharp")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["parent"] == "tiny" and loaded.json()["id"] == "fresh"
    assert "fresh" in [model.id for model in client.models.list().data]
    assert np.array_equal(generate(client, "fresh"), generate(client, "sharp"))
    again = admin(server, "load_lora_adapter", lora_name="fresh", lora_path="pastel")
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    unloaded = admin(server, "unload_lora_adapter", lora_name="fresh")
    assert unloaded.status_code == 200 and unloaded.json() == {"id": "fresh", "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        generate(client, "fresh")
    assert "fresh" not in [model.id for model in client.models.list().data]
    assert admin(server, "unload_lora_adapter", lora_name="fresh").status_code == 404
    assert np.array_equal(generate(client), base)


@pytest.mark.parametrize(
    "path, words",
    [
        ("../outside", "is outside --lora-dir"),
        ("missing", "does not exist"),
        ("not-a-lora.safetensors", "is not a LoRA adapter for StableDiffusionPipeline"),
        ("<the outside adapter's absolute path>", "is outside --lora-dir"),
    ],
)
def test_a_refused_path_is_a_400_that_says_why(server, client, lora_dir, path, words):
    if path.startswith("<"):
        path = str(lora_dir.parent / "outside")
    response = admin(server, "load_lora_adapter", lora_name="refused", lora_path=path)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"] and response.json()["error"]["param"] == "lora_path"
    assert "refused" not in [model.id for model in client.models.list().data]


def test_the_admin_routes_need_the_admin_key_not_a_users(server):
    for key in (None, USER_KEY, "wrong"):
        for route in ("load_lora_adapter", "unload_lora_adapter"):
            response = admin(server, route, key=key, lora_name="sharp", lora_path="sharp")
            assert response.status_code == 401, (route, key)
            assert response.json()["error"]["type"] == "invalid_request_error"
    # Nor is the admin key a user's key.
    refused = httpx.post(
        f"{server.base_url}/v1/images/generations", json={"prompt": "a fox"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert refused.status_code == 401


def test_runtime_loading_is_off_by_default(tiny_server):
    for route in ("load_lora_adapter", "unload_lora_adapter"):
        response = admin(tiny_server, route, lora_name="sharp", lora_path="/tmp")
        assert response.status_code == 404
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unloading_refuses_new_requests_at_once_and_lets_running_ones_finish(client, server, lora_dir):
    assert admin(server, "load_lora_adapter", lora_name="doomed", lora_path="pastel").status_code == 200
    url = f"{server.base_url}/v1/images/generations"
    long_stream = {"model": "doomed", "prompt": "a fox", "size": "64x64", "seed": 1, "num_inference_steps": 80,
                   "stream": True, "progress": True}
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {USER_KEY}"}) as http:
        with http.stream("POST", url, json=long_stream) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: image_generation.progress"
            unload: dict = {}
            unloading = threading.Thread(
                target=lambda: unload.update(response=admin(server, "unload_lora_adapter", lora_name="doomed"))
            )
            unloading.start()

            def listed() -> bool:
                return httpx.get(f"{server.base_url}/v1/models/doomed", headers=http.headers).status_code == 200

            poll(lambda: not listed(), 30, "the adapter being unloaded to leave /v1/models")
            with pytest.raises(openai.NotFoundError):
                generate(client, "doomed")
            assert "response" not in unload  # the running request still holds it
            events = [line.removeprefix("event: ") for line in lines if line.startswith("event:")]
        unloading.join(120)
    assert events[-1] == "image_generation.completed"
    assert unload["response"].status_code == 200


def test_an_unload_waits_for_a_queued_request_that_holds_the_adapter_among_others(client, server):
    """A two-adapter request queued behind a long one: unloading its second adapter ("tardy" sorts after
    "sharp") waits for it. Were only one adapter counted, the unload would reach the worker ahead of the
    queued request, which would then fail."""
    assert admin(server, "load_lora_adapter", lora_name="tardy", lora_path="pastel").status_code == 200
    long_stream = {"model": "sharp", "prompt": "a fox", "size": "64x64", "seed": 1, "num_inference_steps": 80,
                   "stream": True, "progress": True}
    with concurrent.futures.ThreadPoolExecutor(2) as pool, httpx.Client(
        timeout=120, headers={"Authorization": f"Bearer {USER_KEY}"}
    ) as http:
        with http.stream("POST", f"{server.base_url}/v1/images/generations", json=long_stream) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: image_generation.progress"
            # Another set of adapters cannot share the running request's denoiser calls: it waits until that one
            # ends, in the engine's queue (request mode) or in the worker's running set (step mode, the default).
            def taken() -> float:
                return server.metric("imagegen_num_requests_waiting") + server.metric("imagegen_num_requests_running")

            taken_before = taken()
            queued = pool.submit(generate, client, loras=[{"name": "tardy", "scale": 0.5}, {"name": "sharp"}])
            poll(lambda: taken() > taken_before, 30, "the request to be taken")
            unload = pool.submit(admin, server, "unload_lora_adapter", lora_name="tardy")
            poll(lambda: "tardy" not in [m.id for m in client.models.list().data], 30, "tardy to leave /v1/models")
            with pytest.raises(openai.NotFoundError):
                generate(client, loras=[{"name": "tardy"}])
            assert not unload.done()  # the queued request still holds it
            events = [line.removeprefix("event: ") for line in lines if line.startswith("event:")]
        assert events[-1] == "image_generation.completed"
        assert queued.result(timeout=120).shape == (64, 64, 3)
        assert unload.result(timeout=120).status_code == 200


def test_a_cancelled_adapter_request_does_not_hold_up_its_unload(server):
    assert admin(server, "load_lora_adapter", lora_name="abandoned", lora_path="pastel").status_code == 200
    endless = {"model": "abandoned", "prompt": "a fox", "size": "64x64", "num_inference_steps": 1000,
               "stream": True, "progress": True}
    cancelled_before = server.metric("imagegen_requests_cancelled_total")
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {USER_KEY}"}) as http:
        with http.stream("POST", f"{server.base_url}/v1/images/generations", json=endless) as running:
            assert running.status_code == 200
            assert next(line for line in running.iter_lines() if line.startswith("event:")) == "event: image_generation.progress"
    # The client went away: the request is cancelled, and the unload need not wait for its 1000 steps.
    poll(lambda: server.metric("imagegen_requests_cancelled_total") > cancelled_before, 30, "the cancellation")
    unloaded = admin(server, "unload_lora_adapter", lora_name="abandoned")
    assert unloaded.status_code == 200, unloaded.text


def test_a_start_up_adapter_that_cannot_load_stops_the_server_with_one_line(lora_dir):
    result = run_cli(
        "serve", "--model", "tiny", "--port", "0", "--lora-dir", str(lora_dir),
        "--lora-modules", "ok=sharp", "broken=not-a-lora.safetensors", timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("imagegen:")]
    assert len(lines) == 1
    assert "LoRA adapter 'broken'" in lines[0] and "is not a LoRA adapter for StableDiffusionPipeline" in lines[0]
