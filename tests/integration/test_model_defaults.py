"""A model folder's imagegen.json: its defaults win over the built-in ones, a setting that was set wins
over it, /v1/models and the start-up log say what is in force, and a malformed file stops start-up."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from helpers import ServerProcess, decode, run_cli

from workers.models.catalog import DEMO_MODEL_PATH

pytestmark = pytest.mark.slow


@pytest.fixture
def model_folder(tmp_path):
    """A copy of the demo model whose imagegen.json asks for 3 steps at 32x32."""
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_PATH, folder)
    (folder / "imagegen.json").write_text(json.dumps({"default_num_inference_steps": 3, "native_size": "32x32"}))
    return folder


def generate(server: ServerProcess, **body) -> httpx.Response:
    response = httpx.post(
        f"{server.base_url}/v1/images/generations", json={"prompt": "a red circle", "seed": 5, **body}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()


def defaults_listed(server: ServerProcess) -> tuple:
    """The defaults in force, as /v1/models lists them."""
    (card,) = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    return card["default_num_inference_steps"], card["default_guidance_scale"], card["default_size"]


def pixels(body: dict):
    return decode(body["data"][0]["b64_json"])


def test_the_folders_defaults_apply_and_are_reported(model_folder):
    server = ServerProcess("--model", str(model_folder), "--allowed-sizes", "32x32,64x64")
    try:
        # Guidance is not in this file: the pipeline's own (null).
        assert defaults_listed(server) == (3, None, "32x32")
        plain = generate(server)
        assert plain["size"] == "32x32"
        # Same request alone, the steps named: the same computation, so the same pixels.
        assert (pixels(plain) == pixels(generate(server, num_inference_steps=3, size="32x32"))).all()
        assert (pixels(plain) != pixels(generate(server, num_inference_steps=4, size="32x32"))).any()
        assert "defaults in force: num_inference_steps=3 (imagegen.json)" in server.output()
    finally:
        server.stop()


def test_a_setting_that_was_set_wins_over_the_folder(model_folder):
    server = ServerProcess(
        "--model", str(model_folder), "--default-size", "64x64", env={"IMAGEGEN_DEFAULT_NUM_INFERENCE_STEPS": "2"}
    )
    try:
        assert defaults_listed(server) == (2, None, "64x64")
        plain = generate(server)
        assert plain["size"] == "64x64"
        assert (pixels(plain) == pixels(generate(server, num_inference_steps=2))).all()
        assert "num_inference_steps=2 (setting)" in server.output()
    finally:
        server.stop()


def test_without_a_file_the_built_in_default_applies(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_PATH, folder)
    (folder / "imagegen.json").unlink()
    server = ServerProcess("--model", str(folder))
    try:
        assert defaults_listed(server) == (20, None, "64x64")
    finally:
        server.stop()


@pytest.mark.parametrize(
    "content, problem",
    [("{not json", "Invalid JSON"), ('{"default_num_inference_steps": 0}', "greater than or equal to 1"),
     ('{"default_steps": 30}', "default_steps: Extra inputs are not permitted")],
)
def test_a_malformed_file_is_a_start_up_error_naming_it(model_folder, content, problem):
    (model_folder / "imagegen.json").write_text(content)
    result = run_cli("serve", "--model", str(model_folder), "--port", "0")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("imagegen:")]
    assert len(lines) == 1 and str(model_folder / "imagegen.json") in lines[0] and problem in lines[0], result.stderr
    assert "Traceback" not in result.stderr
