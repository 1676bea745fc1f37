from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from engine import OmniDiffusionConfig, OmniDiffusionRequest, parse_size
from executors import DiffusionExecutor, MultiProcDiffusionExecutor, get_executor_class
from server.cli import build_parser
from workers.data import Default, defaults_in_force, with_defaults


class CustomExecutor(MultiProcDiffusionExecutor):
    """A user's subclass, named by class or by 'module:Class'."""


def test_env_prefix_and_keyword_precedence(monkeypatch):
    monkeypatch.setenv("IMAGEGEN_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("IMAGEGEN_ALLOWED_SIZES", "64x64, 128x128")
    config = OmniDiffusionConfig()
    assert config.max_batch_size == 3
    assert config.allowed_sizes == ["64x64", "128x128"]
    assert OmniDiffusionConfig(max_batch_size=5).max_batch_size == 5


def test_defaults_match_the_brief(monkeypatch):
    monkeypatch.delenv("IMAGEGEN_MODEL", raising=False)  # conftest points the other tests at tiny
    config = OmniDiffusionConfig()
    assert (config.model, config.num_gpus, config.distributed_executor_backend) == ("demo", 1, "mp")
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.model_name == "demo"
    assert OmniDiffusionConfig(served_model_name="fox").model_name == "fox"


@pytest.mark.parametrize(
    "field, value",
    [("allowed_sizes", "64x60"), ("default_size", "fox"), ("num_gpus", 0), ("device", "tpu"), ("dtype", "int8")],
)
def test_invalid_settings_are_rejected(field, value):
    with pytest.raises(ValidationError):
        OmniDiffusionConfig(**{field: value})


def test_default_size_must_be_allowed():
    with pytest.raises(ValidationError, match="not in allowed_sizes"):
        OmniDiffusionConfig(default_size="96x96")


def test_cli_flags_map_one_to_one_onto_settings():
    args = build_parser().parse_args(
        ["serve", "--backend", "mp", "--max-batch-size", "4", "--batch-timeout-ms", "2.5", "--device", "cpu"]
    )
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    assert flags == {"distributed_executor_backend": "mp", "max_batch_size": 4, "batch_timeout_ms": 2.5, "device": "cpu"}
    assert set(flags) <= set(OmniDiffusionConfig.model_fields)


def test_backend_names_classes_and_import_strings():
    assert get_executor_class("mp") is MultiProcDiffusionExecutor
    assert get_executor_class(CustomExecutor) is CustomExecutor
    assert get_executor_class(f"{__name__}:CustomExecutor") is CustomExecutor
    assert issubclass(get_executor_class("mp"), DiffusionExecutor)


@pytest.mark.parametrize("backend", ["nope", "os.path:join", "no.such.module:Thing", int])
def test_unknown_backend_is_value_error_listing_valid_ones(backend):
    with pytest.raises(ValueError, match="mp") if backend == "nope" else pytest.raises(ValueError):
        get_executor_class(backend)


def test_parse_size():
    assert parse_size("512x768") == (512, 768)
    for bad in ("512", "x", "axb", "-1x5"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_readme_documents_every_setting():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in OmniDiffusionConfig.model_fields:
        assert f"| `--{name.replace('_', '-')}`" in readme and f"`IMAGEGEN_{name.upper()}`" in readme, name


def test_defaults_in_force_take_a_setting_then_the_models_file_then_the_built_in():
    model_info = {"native_size": "64x64", "model_defaults": {"default_num_inference_steps": 30, "native_size": "32x32"}}
    defaults = defaults_in_force(OmniDiffusionConfig(), model_info)
    assert defaults["num_inference_steps"] == Default(30, "imagegen.json")
    assert defaults["size"] == Default("32x32", "imagegen.json")
    assert defaults["guidance_scale"] == Default(None, "the pipeline's")
    set_ = defaults_in_force(OmniDiffusionConfig(default_num_inference_steps=4, default_guidance_scale=2.0), model_info)
    assert set_["num_inference_steps"] == Default(4, "setting") and set_["guidance_scale"] == Default(2.0, "setting")
    bare = defaults_in_force(OmniDiffusionConfig(), {"native_size": "64x64", "model_defaults": {}})
    assert bare["num_inference_steps"] == Default(20, "built-in") and bare["size"] == Default("64x64", "model")
    # The request's own values come first, then these.
    request = with_defaults(OmniDiffusionRequest("a fox", num_inference_steps=7), OmniDiffusionConfig(), model_info)
    assert (request.num_inference_steps, request.width, request.height) == (7, 32, 32)
