"""LoRA adapters on one worker (WorkerWrapperBase with the tiny model, in this process)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from lora_adapters import make_kohya_lora, make_lora

from engine import LoraWeight, OmniDiffusionConfig, OmniDiffusionRequest
from workers.worker import WorkerWrapperBase


@pytest.fixture(scope="module")
def worker(model_cache):
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny"))
    worker.initialize()
    yield worker
    worker.shutdown()


def _image(worker, **fields) -> np.ndarray:
    request = OmniDiffusionRequest("a red fox", height=64, width=64, num_inference_steps=3, seed=7, **fields)
    (output,) = worker.generate([request])
    assert output.error is None, output.error
    return output.images[0]


def _base_weights(worker) -> dict[str, tuple[int, torch.Tensor]]:
    """Every non-LoRA weight of the UNet and text encoder, by name without peft's wrapper, with its storage."""
    weights = {}
    for component in ("unet", "text_encoder"):
        for name, parameter in getattr(worker.pipeline, component).named_parameters():
            if "lora_" not in name:
                weights[f"{component}.{name.replace('.base_layer', '')}"] = (parameter.data_ptr(), parameter.detach().clone())
    return weights


def test_adapters_share_the_base_weights_and_leave_base_pixels_bit_for_bit(worker, model_cache, tmp_path, caplog):
    base = _image(worker)
    before = _base_weights(worker)
    folder = make_lora(tmp_path / "sharp", model_cache, seed=1)
    kohya = make_kohya_lora(tmp_path / "kohya.safetensors", model_cache, seed=2)
    with caplog.at_level(logging.INFO, logger="workers.runtime.lora"):
        sharp = worker.load_lora_adapter("sharp", str(folder))
        assert "error" not in worker.load_lora_adapter("kohya", str(kohya))
    assert sharp["components"] == ["text_encoder", "unet"] and sharp["weights_bytes"] > 0
    assert "loaded LoRA adapter sharp" in caplog.text and "peak memory" in caplog.text
    assert worker.describe()["lora_adapters"] == ["kohya", "sharp"]
    # The same adapter again (a worker reconnected without a restart) is already there; another path is not.
    assert worker.load_lora_adapter("sharp", str(folder)) == sharp
    assert "already loaded" in worker.load_lora_adapter("sharp", str(kohya))["error"]
    # The base weights are the same tensors, in the same memory: nothing was copied or reloaded.
    after = _base_weights(worker)
    assert after.keys() == before.keys()
    for name, (pointer, value) in before.items():
        assert after[name][0] == pointer, name
        assert torch.equal(after[name][1], value), name
    with_sharp, with_kohya = _image(worker, loras=(LoraWeight("sharp"),)), _image(worker, loras=(LoraWeight("kohya"),))
    assert np.abs(with_sharp.astype(int) - base).max() > 8
    assert np.abs(with_kohya.astype(int) - base).max() > 8
    assert np.abs(with_kohya.astype(int) - with_sharp).max() > 8
    assert np.array_equal(_image(worker, loras=(LoraWeight("sharp", 0.0),)), base)
    # Both at once: their effects summed (set_adapters), unlike either alone; both at scale 0 is the base.
    both = _image(worker, loras=(LoraWeight("sharp"), LoraWeight("kohya")))
    assert np.abs(both.astype(int) - with_sharp).max() > 8 and np.abs(both.astype(int) - with_kohya).max() > 8
    assert np.array_equal(_image(worker, loras=(LoraWeight("kohya"), LoraWeight("sharp"))), both)
    assert np.array_equal(_image(worker, loras=(LoraWeight("sharp", 0.0), LoraWeight("kohya", 0.0))), base)
    # After adapter calls, and after unloading, the base model's pixels are what they were.
    assert np.array_equal(_image(worker), base)
    assert worker.unload_lora_adapter("sharp") and worker.unload_lora_adapter("kohya")
    assert not worker.unload_lora_adapter("sharp")
    assert worker.describe()["lora_adapters"] == []
    assert not [n for n, _ in worker.pipeline.unet.named_parameters() if "lora_" in n]
    assert np.array_equal(_image(worker), base)


def test_a_file_that_is_no_lora_is_refused_and_leaves_nothing_behind(worker, model_cache, tmp_path):
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(4, 4)}, tmp_path / "weights.safetensors")
    reply = worker.load_lora_adapter("bogus", str(tmp_path / "weights.safetensors"))
    assert "is not a LoRA adapter for StableDiffusionPipeline" in reply["error"]
    assert worker.describe()["lora_adapters"] == []
    reply = worker.load_lora_adapter("bogus", str(tmp_path / "missing"))
    assert reply["error"] == f"LoRA path '{tmp_path / 'missing'}' does not exist"
