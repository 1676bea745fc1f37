"""The settings of each model a server serves (workers/model_settings.py): --model with several, the models
file's entries (server-wide settings overridden, validated by the same settings model), and its refusals,
each naming the entry and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.config import OmniDiffusionConfig
from workers.model_settings import (
    ENTRY_KEYS,
    MODEL_FIELDS,
    SERVER_FIELDS,
    ModelSettingsError,
    is_external,
    model_settings,
)


def settings_of(tmp_path: Path, text: str, **server_wide) -> list[OmniDiffusionConfig]:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return model_settings(OmniDiffusionConfig(models_file=path, **server_wide))


def test_every_setting_is_a_models_or_the_servers():
    assert MODEL_FIELDS | SERVER_FIELDS == set(OmniDiffusionConfig.model_fields)
    assert not MODEL_FIELDS & SERVER_FIELDS
    assert set(ENTRY_KEYS.values()) == MODEL_FIELDS


def test_several_models_each_get_the_server_wide_settings():
    config = OmniDiffusionConfig(model=["demo", "tiny-flux"], max_batch_size=3, port=9000)
    assert config.model == "demo,tiny-flux" and config.models == ["demo", "tiny-flux"]
    first, second = model_settings(config)
    assert (first.model, second.model) == ("demo", "tiny-flux")
    assert first.max_batch_size == second.max_batch_size == 3 and second.port == 9000
    assert model_settings(OmniDiffusionConfig(model="demo,tiny"))[1].model_name == "tiny"


def test_an_entry_overrides_the_server_wide_settings_and_keeps_the_rest(tmp_path):
    fast, slow = settings_of(
        tmp_path,
        "- model: tiny\n  served_model_name: fast\n  keep_alive_s: 30\n  max_batch_size: 2\n  preload: false\n"
        "- model: demo\n  device_ids: [2, 3]\n  num_gpus: 2\n",
        max_batch_size=6,
        max_queue_size=17,
    )
    assert (fast.model_name, fast.model_keep_alive_s, fast.max_batch_size, fast.preload) == ("fast", 30, 2, False)
    assert (slow.model_name, slow.max_batch_size, slow.max_queue_size, slow.model_keep_alive_s) == ("demo", 6, 17, -1)
    assert slow.device_ids == [2, 3] and slow.device_index(1) == 3 and fast.device_index(1) == 1
    assert fast.models_file is None


def test_an_entrys_settings_tell_a_default_from_a_choice_as_the_servers_do(tmp_path):
    # The engine says why step mode cannot run as a warning when it was asked for, as info when it is the default.
    (default,) = settings_of(tmp_path, "- model: tiny\n")
    assert default.scheduling == "step" and "scheduling" not in default.model_fields_set
    (chosen,) = settings_of(tmp_path, "- model: tiny\n", scheduling="request")
    assert chosen.scheduling == "request" and "scheduling" in chosen.model_fields_set


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- model: tiny\n  port: 9000\n", "entry 1 (tiny): 'port' is a server-wide setting"),
        ("- model: tiny\n- model: demo\n  api_key: [x]\n", "entry 2 (demo): 'api_key' is a server-wide setting"),
        ("- model: tiny\n  max_batch_sise: 2\n", "entry 1 (tiny): unknown key 'max_batch_sise'"),
        ("- model: tiny\n  max_batch_size: 0\n", "entry 1 (tiny): 'max_batch_size': Input should be greater"),
        ("- model: tiny\n  keep_alive_s: -3\n", "entry 1 (tiny): 'keep_alive_s': Input should be greater"),
        ("- model: tiny\n  device_ids: [0, 1]\n", "entry 1 (tiny): device_ids names 2 devices for 1 ranks"),
        ("- served_model_name: x\n", "entry 1: every entry needs a 'model' key"),
        ("- model: tiny,demo\n", "entry 1 (tiny,demo): 'model' names one model per entry"),
        ("model: tiny\n", "must be a non-empty list of entries"),
        ("- model: tiny\n- model: tiny\n", "the name 'tiny' is a model and a model"),
        (
            "- model: tiny\n  lora_modules: [demo=/loras/x]\n- model: demo\n",
            "the name 'demo' is a LoRA adapter of 'tiny' and a model",
        ),
    ],
)
def test_a_bad_entry_is_refused_naming_the_file_entry_and_key(tmp_path, text, message):
    with pytest.raises(ModelSettingsError) as refused:
        settings_of(tmp_path, text)
    assert message in str(refused.value) and "models.yaml" in str(refused.value)


def test_a_grpc_entry_stands_beside_mp_entries_and_is_external(tmp_path):
    local, remote = settings_of(
        tmp_path,
        "- model: tiny\n- model: tiny-flux\n  distributed_executor_backend: grpc\n"
        "  worker_addresses: ['127.0.0.1:50051']\n",
    )
    assert not is_external(local) and is_external(remote) and remote.worker_addresses == ["127.0.0.1:50051"]


def test_served_model_name_with_several_models_is_refused():
    with pytest.raises(ValueError, match="served_model_name names one model"):
        OmniDiffusionConfig(model="demo,tiny", served_model_name="x")


def test_the_memory_of_an_int8_module_is_its_inner_tensors_and_the_meta_estimate_of_fp32_weights_is_exact():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from workers.runtime.memory import estimate_pipeline_bytes, measure_weights, tensor_bytes

    class Pipeline:
        def __init__(self, **components):
            self.components = components

    linear = torch.nn.Linear(64, 32, bias=False)
    plain = measure_weights(Pipeline(denoiser=linear), torch.device("cpu"))["memory_bytes"]["cpu"]
    assert plain == 64 * 32 * 4
    quantize_(linear, Int8WeightOnlyConfig())
    quantized = measure_weights(Pipeline(denoiser=linear), torch.device("cpu"))["memory_bytes"]["cpu"]
    names, _ = linear.weight.__tensor_flatten__()
    inner = sum(tensor_bytes(getattr(linear.weight, name), set()) for name in names)
    assert quantized == inner and 64 * 32 <= quantized < plain / 2

    from diffusers import DiffusionPipeline

    from workers.models.catalog import DEMO_MODEL_PATH

    pipeline = DiffusionPipeline.from_pretrained(DEMO_MODEL_PATH, dtype=torch.float32)
    measured = measure_weights(pipeline, torch.device("cpu"))["memory_bytes"]["cpu"]
    assert estimate_pipeline_bytes(DEMO_MODEL_PATH, torch.float32) == measured
    assert estimate_pipeline_bytes(DEMO_MODEL_PATH, torch.bfloat16) < measured * 0.6


class DriverFreeBytes:
    """Stands in for torch.cuda.mem_get_info (no GPU here: the CUDA boundary is the one thing mocked): the free
    bytes the driver reports on each call, the last repeated."""

    def __init__(self, *free_bytes: int):
        self.free_bytes = list(free_bytes)
        self.calls = 0

    def __call__(self, device) -> tuple[int, int]:
        assert torch.device(device).type == "cuda"
        free = self.free_bytes[min(self.calls, len(self.free_bytes) - 1)]
        self.calls += 1
        return free, 80 * 2**30


def test_a_cuda_load_waits_until_the_driver_reports_the_models_room_back(monkeypatch):
    from workers.runtime.memory import estimate_model_bytes, wait_for_room_to_load

    config = OmniDiffusionConfig(model="demo", device="cpu")  # the dtype the estimate counts in: float32
    needed = estimate_model_bytes(config)
    # The workers of the model unloaded for this one have exited; the driver hands their memory back.
    driver = DriverFreeBytes(needed // 4, needed - 1, needed)
    monkeypatch.setattr(torch.cuda, "mem_get_info", driver)
    wait_for_room_to_load(config, torch.device("cuda", 0), timeout_s=60)
    assert driver.calls == 3  # returned as soon as the room was there, not before


def test_a_cuda_load_waits_for_room_a_bounded_time_then_goes_ahead_and_says_why(monkeypatch, caplog):
    from workers.runtime.memory import wait_for_room_to_load

    config = OmniDiffusionConfig(model="demo", device="cpu")
    driver = DriverFreeBytes(2**20)  # never enough: another process holds the device
    monkeypatch.setattr(torch.cuda, "mem_get_info", driver)
    with caplog.at_level("WARNING", logger="workers.runtime.memory"):
        wait_for_room_to_load(config, torch.device("cuda", 0), timeout_s=0.3)
    assert driver.calls >= 2
    assert "loading anyway" in caplog.text
    # Nothing to wait for on the CPU, nor where the estimate does not hold (quantized weights).
    driver.calls = 0
    wait_for_room_to_load(config, torch.device("cpu"), timeout_s=60)
    wait_for_room_to_load(config.model_copy(update={"quantization": "int8wo"}), torch.device("cuda", 0), timeout_s=60)
    assert driver.calls == 0
