"""The speed levers' start-up checks and the full-size random-weight architectures, on the meta device
(no memory, no weights): parameter counts against the published ones, and which cache method hooks
which denoiser (the table in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from workers.config import OmniDiffusionConfig
from workers.data import OmniDiffusionRequest
from workers.models.random_weights import RANDOM_WEIGHT_MODELS, build_random_weight_pipeline

# The published sizes: SD 1.5 UNet 859.52M, SDXL UNet 2.567B, FLUX.1-dev transformer 11.9B, T5-XXL
from workers.models.tiny import t5_tokenizer
from workers.runtime.levers import CACHE_METHODS, LeverError, Levers, cache_config, count_hooked_modules

# The published sizes: SD 1.5 UNet 859.52M, SDXL UNet 2.567B, FLUX.1-dev transformer 11.9B, T5-XXL
# encoder 4.76B, CLIP ViT-L/14 text 123.06M, OpenCLIP ViT-bigG/14 text 694.66M, the SD VAE 83.65M
# (Flux's, with 16 latent channels, 83.82M).
PUBLISHED_PARAMETERS = {
    "random-sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "random-sdxl": {
        "unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
    },
    "random-flux-dev": {
        "transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,
    },
}
# Which cache methods hook anything in each architecture's denoiser (diffusers 0.42).
HOOKING_METHODS = {
    "random-sd15": {"pab"},
    "random-sdxl": {"pab"},
    "random-flux-dev": {"first-block", "taylorseer", "faster", "pab"},
}


@pytest.fixture(scope="module", params=RANDOM_WEIGHT_MODELS)
def meta_pipeline(request):
    return request.param, build_random_weight_pipeline(request.param, "meta", torch.bfloat16)


def test_random_weight_models_have_the_published_parameter_counts(meta_pipeline):
    name, pipeline = meta_pipeline
    counts = {
        component: sum(p.numel() for p in module.parameters())
        for component, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module)
    }
    assert counts == PUBLISHED_PARAMETERS[name]
    assert {p.dtype for module in pipeline.components.values() if isinstance(module, torch.nn.Module)
            for p in module.parameters()} == {torch.bfloat16}


def test_cache_methods_hook_what_the_docs_table_says(meta_pipeline):
    name, pipeline = meta_pipeline
    denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
    assert {method for method in CACHE_METHODS if count_hooked_modules(denoiser, method)} == HOOKING_METHODS[name]


def test_t5_tokenizer_uses_t5s_special_ids_offline():
    tokenizer = t5_tokenizer()
    ids = tokenizer("a fox é", padding="max_length", max_length=12).input_ids
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1 and tokenizer.unk_token_id == 2
    assert ids[-1] == 0 and 1 in ids and 2 in ids  # padded, ended, and the accent is unknown
    assert tokenizer.batch_decode([tokenizer("a red fox").input_ids], skip_special_tokens=True) == ["a red fox"]


def test_cache_options_are_checked_against_the_method():
    denoiser = build_random_weight_pipeline("random-flux-dev", "meta", torch.bfloat16).transformer
    config = cache_config("taylorseer", {"cache_interval": 3, "taylor_factors_dtype": "float16"}, denoiser,
                          torch.float32, lambda: 0)
    assert config.cache_interval == 3 and config.taylor_factors_dtype is torch.float16
    # The factors follow the pipeline's dtype unless the options say otherwise.
    assert cache_config("taylorseer", {}, denoiser, torch.float32, lambda: 0).taylor_factors_dtype is torch.float32
    # Flux's guidance is an embedding: FasterCache must not look for a batched unconditional half.
    assert cache_config("faster", {}, denoiser, torch.float32, lambda: 0).is_guidance_distilled
    with pytest.raises(LeverError, match="has no cache_intervall; it takes .*cache_interval"):
        cache_config("taylorseer", {"cache_intervall": 3}, denoiser, torch.float32, lambda: 0)
    with pytest.raises(LeverError, match="cannot set current_timestep_callback"):
        cache_config("pab", {"current_timestep_callback": "x"}, denoiser, torch.float32, lambda: 0)
    with pytest.raises(LeverError, match="must be one of float32"):
        cache_config("taylorseer", {"taylor_factors_dtype": "int8"}, denoiser, torch.float32, lambda: 0)


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"cache_options": "{not json"}, "must be a JSON object"),
        ({"cache_options": "[1, 2]"}, "must be a JSON object"),
        ({"cache_method": "mag"}, "cache_method"),
        ({"compile": "max"}, "compile"),
        ({"compile_warmup_sizes": "64x64,big"}, "size must look like"),
    ],
)
def test_bad_lever_settings_are_configuration_errors(settings, problem):
    with pytest.raises(ValidationError, match=problem):
        OmniDiffusionConfig(**settings)


def test_lever_settings_parse_from_strings_as_flags_and_environment_give_them():
    config = OmniDiffusionConfig(
        cache_options='{"cache_interval": 4}', compile_warmup_sizes="64x64, 128x96", vae_tiling="true"
    )
    assert config.cache_options == {"cache_interval": 4}
    assert config.compile_warmup_sizes == ["64x64", "128x96"]
    assert config.vae_tiling is True


def test_cache_switch_is_part_of_the_batch_key_and_adaptive_caches_run_requests_apart():
    cached, uncached = (OmniDiffusionRequest("x", 64, 64, num_inference_steps=4, seed=0, cache=c) for c in (1, 0))
    assert cached.batch_key() != uncached.batch_key()
    other = OmniDiffusionRequest("y", 64, 64, num_inference_steps=4, seed=1)
    assert Levers(cache_method="taylorseer").call_key(cached) == Levers(cache_method="taylorseer").call_key(other)
    first_block = Levers(cache_method="first-block")
    assert first_block.call_key(cached) != first_block.call_key(other)
    # Uncached requests have no activations to compare: they batch as usual.
    assert first_block.call_key(uncached) == first_block.call_key(
        OmniDiffusionRequest("y", 64, 64, num_inference_steps=4, seed=1, cache=False)
    )
