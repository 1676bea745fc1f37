"""Speed levers on the tiny models: the pixels each one promises (workers called in this process), then
a real server started with each lever, driven by the official client, reporting it, and the
combinations that must stop `imagegen serve` with one line. torch.compile is in test_compile.py."""

from __future__ import annotations

import functools
import re

import numpy as np
import openai
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import ServerProcess, assert_pixels_close, run_cli

from workers.config import OmniDiffusionConfig
from workers.data import OmniDiffusionRequest
from workers.models.catalog import resolve_model_path
from workers.worker import WorkerWrapperBase

pytestmark = pytest.mark.slow

# Enough for every schedule to skip some; odd, so that PAB state left over from a call would shift its pattern.
STEPS = 9
# Options that make each method skip within STEPS steps on the tiny models (FirstBlockCache's
# threshold is on random weights' residuals, so it is set to skip whenever it may).
CACHES = {
    "taylorseer": {"disable_cache_before_step": 2, "cache_interval": 3},
    "pab": {},
    "faster": {},
    "first-block": {"threshold": 10.0},
}
FIXED_SCHEDULE = [("tiny-flux", "taylorseer"), ("tiny-flux", "pab"), ("tiny-flux", "faster"), ("tiny", "pab")]


@functools.cache
def worker(model: str, cache_method: str = "none") -> WorkerWrapperBase:
    settings = {"cache_method": cache_method, "cache_options": CACHES.get(cache_method, {})}
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model=model, device="cpu", **settings))
    worker.initialize()
    return worker


def generate(model: str, cache_method: str, seeds, cache: bool = True) -> np.ndarray:
    requests = [OmniDiffusionRequest("a red fox", num_inference_steps=STEPS, seed=s, cache=cache) for s in seeds]
    outputs = worker(model, cache_method).generate(requests)
    assert all(output.error is None for output in outputs), [output.error for output in outputs]
    return np.stack([output.images[0] for output in outputs]).astype(np.int16)


@pytest.mark.parametrize("model", ["tiny", "tiny-flux", "tiny-sd3"])
def test_no_levers_give_the_raw_pipelines_pixels_bit_for_bit(model, model_cache):
    pipeline = DiffusionPipeline.from_pretrained(resolve_model_path(model, model_cache), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    raw = pipeline(
        prompt=["a red fox"] * 2, height=64, width=64, num_inference_steps=STEPS, output_type="np",
        generator=[torch.Generator().manual_seed(seed) for seed in (5, 6)],
    ).images
    raw = (np.asarray(raw) * 255).round().clip(0, 255).astype(np.int16)
    assert np.array_equal(generate(model, "none", [5, 6]), raw)


@pytest.mark.parametrize("model, method", [*FIXED_SCHEDULE, ("tiny-flux", "first-block")])
def test_a_request_without_the_cache_gets_the_uncached_pixels_bit_for_bit(model, method):
    plain = generate(model, "none", [1, 2])
    assert np.array_equal(generate(model, method, [1, 2], cache=False), plain)
    cached = generate(model, method, [1, 2])
    assert not np.array_equal(cached, plain)  # the cache did skip work
    # And the switch back: the cache is on again, with no state left from the uncached call.
    assert np.array_equal(generate(model, method, [1, 2]), cached)


@pytest.mark.parametrize("model, method", FIXED_SCHEDULE)
def test_fixed_schedule_cache_batched_equals_one_by_one_within_tolerance_and_replays_exactly(model, method):
    batched = generate(model, method, [1, 2, 3])
    assert np.array_equal(generate(model, method, [1, 2, 3]), batched)  # no state leaks between calls
    for index, seed in enumerate([1, 2, 3]):
        assert_pixels_close(generate(model, method, [seed])[0], batched[index])


def test_first_block_cache_gives_a_request_the_same_pixels_whatever_its_batch_mates():
    # FirstBlockCache decides to skip from a mean over its whole call: each request gets calls of its own.
    together = generate("tiny-flux", "first-block", [1, 2, 3])
    for index, seed in enumerate([1, 2, 3]):
        assert np.array_equal(generate("tiny-flux", "first-block", [seed])[0], together[index])


# -- servers ---------------------------------------------------------------------------------
SERVED_LEVERS = [
    # Levers that do not touch each other share a server (each server start costs seconds).
    (("--model", "tiny-flux", "--cache-method", "taylorseer", "--cache-options", '{"cache_interval": 3}',
      "--attention-backend", "native"),
     {"cache_method": "taylorseer", "cache_hooked_modules": 2, "cache_options": {"cache_interval": 3},
      "attention_backend": "native", "attention_processors": 2}),
    (("--model", "tiny-flux", "--cache-method", "first-block"), {"cache_method": "first-block"}),
    (("--model", "tiny-flux", "--cache-method", "faster"), {"cache_method": "faster", "cache_hooked_modules": 2}),
    (("--model", "tiny", "--cache-method", "pab", "--vae-tiling", "true", "--vae-slicing", "true"),
     {"cache_method": "pab", "cache_hooked_modules": 4, "vae_tiling": True, "vae_slicing": True}),
]


@pytest.mark.parametrize("flags, reported", SERVED_LEVERS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_server_with_a_lever_serves_the_official_client_and_reports_it(flags, reported):
    server = ServerProcess(*flags)
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        levers = client.models.list().data[0].model_extra["levers"]
        assert levers | reported == levers, levers
        for cache in (True, False):
            response = client.images.generate(
                prompt="a red fox", size="64x64", n=2, extra_body={"num_inference_steps": 4, "seed": 1, "cache": cache}
            )
            assert len(response.data) == 2
        assert f"levers: {{'cache_method': '{levers['cache_method']}'" in server.output()  # the start-up log
    finally:
        server.stop()


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"cache_method": "taylorseer"}, "taylorseer hooks nothing in UNet2DConditionModel; methods that do: pab"),
        ({"offload": "model"}, "--offload model moves weights between the CPU and an accelerator"),
        ({"attention_backend": "flash_hub"}, "flash_hub downloads kernels at run time"),
        ({"attention_backend": "native"}, "cannot reach UNet2DConditionModel's attention processors"),
        ({"model": "tiny-flux", "attention_backend": "flash"}, "not usable because of missing package"),
        ({"model": "tiny-sd3", "cache_method": "taylorseer"}, "StableDiffusion3Pipeline does not; pab or faster"),
    ],
)
def test_bad_lever_combinations_stop_a_worker_at_start_up(settings, problem):
    # A worker in this process; the test below proves once that such an error stops the server with one line.
    config = OmniDiffusionConfig(**{"model": "tiny", "device": "cpu", **settings})
    with pytest.raises(Exception, match=re.escape(problem)):
        WorkerWrapperBase(0, config).initialize()


@pytest.mark.parametrize(
    "flags, problem",
    [
        (("--cache-options", "{not json"), "invalid configuration: --cache-options: must be a JSON object"),
        (("--model", "tiny-flux", "--cache-method", "pab", "--cache-options", '{"skip": 2}'),
         "--cache-options for pab has no skip; it takes"),
    ],
)
def test_bad_lever_combinations_stop_the_server_with_one_line(flags, problem):
    result = run_cli("serve", "--model", "tiny", "--device", "cpu", "--port", "0", *flags, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("imagegen:")]
    assert len(lines) == 1 and problem in lines[0], result.stderr[-2000:]


def test_an_unknown_cache_method_is_refused_with_the_valid_ones():
    result = run_cli("serve", "--cache-method", "mag", "--port", "0")
    assert result.returncode == 2
    assert "invalid choice: 'mag' (choose from 'none', 'first-block', 'taylorseer', 'faster', 'pab')" in result.stderr
