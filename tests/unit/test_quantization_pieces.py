"""The pieces of quantization that need no model: counting a quantized tensor's bytes, the per-component
configs, and the plan's refusals (start-up errors in one line) before anything loads."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from workers.config import OmniDiffusionConfig
from workers.runtime.memory import module_weight_bytes, tensor_bytes
from workers.runtime.quantization import QuantizationError, QuantizationPlan, component_config


def test_an_int8_linear_is_counted_by_its_inner_tensors_not_its_logical_size():
    linear = torch.nn.Linear(64, 32, bias=False)
    assert module_weight_bytes(linear) == 64 * 32 * 4
    quantize_(linear, Int8WeightOnlyConfig())
    weight = linear.weight
    # The subclass reports the float32 size it stands for; what it holds is int8 data and a scale per row.
    assert weight.nbytes == 64 * 32 * 4
    names, _ = weight.__tensor_flatten__()
    inner = sum(getattr(weight, name).untyped_storage().nbytes() for name in names if getattr(weight, name) is not None)
    assert inner < 64 * 32 * 2
    assert module_weight_bytes(linear) == module_weight_bytes(linear, linear_only=True) == inner
    assert module_weight_bytes(linear) >= 64 * 32  # at least one byte per weight


def test_tensors_that_share_storage_are_counted_once():
    shared = torch.zeros(16)
    seen: set[int] = set()
    assert tensor_bytes(shared, seen) == 64
    assert tensor_bytes(shared[:8], seen) == 0


def test_each_component_gets_its_own_librarys_config():
    import diffusers
    import transformers

    assert isinstance(component_config("int8wo", "diffusers", torch.float32), diffusers.TorchAoConfig)
    assert isinstance(component_config("int8wo", "transformers", torch.float32), transformers.TorchAoConfig)


def plan(device: str = "cpu", dtype=torch.float32, **settings) -> QuantizationPlan:
    return QuantizationPlan.for_config(OmniDiffusionConfig(**settings), torch.device(device), dtype)


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"quantization": "nf4"}, "needs a CUDA device, but the device is cpu"),
        ({"quantization": "float8dq"}, "compute capability 8.9 or later, not cpu"),
        ({"quantization": "int8wo", "model": "random-sd15", "dtype": "bfloat16"}, "on the CPU runs in float32"),
        ({"quantize_components": ["unet"]}, "--quantize-components needs a --quantization method"),
        ({"model": "random-flux-dev", "denoiser_file": "/x/model.gguf"}, "is built from configs, not loaded"),
    ],
)
def test_what_cannot_run_is_refused_before_loading(settings, problem):
    dtype = torch.bfloat16 if settings.pop("dtype", None) == "bfloat16" else torch.float32
    with pytest.raises(QuantizationError, match=problem):
        plan(dtype=dtype, **settings)


def test_the_default_components_are_the_denoiser_and_the_t5_encoders_by_class():
    # random-flux-dev's text_encoder_2 is T5; random-sdxl's is CLIP (its configs are committed, nothing loads).
    assert plan(model="random-flux-dev", quantization="int8wo").components == {
        "text_encoder_2": "transformers", "transformer": "diffusers",
    }
    assert plan(model="random-sdxl", quantization="int8wo").components == {"unet": "diffusers"}
