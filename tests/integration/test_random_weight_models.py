"""random-sd15 loaded for real: the full-size SD 1.5 architecture with random weights, built at load
time on the worker's device and dtype and never written to disk. (random-sdxl and random-flux-dev are
checked on the meta device only: tests/unit/test_levers_and_model_configs.py.)"""

from __future__ import annotations

import pytest

from workers.config import OmniDiffusionConfig
from workers.data import OmniDiffusionRequest
from workers.worker import WorkerWrapperBase

pytestmark = pytest.mark.slow


def test_random_sd15_loads_generates_and_writes_nothing(tmp_path):
    config = OmniDiffusionConfig(model="random-sd15", device="cpu", dtype="bfloat16", model_cache_dir=tmp_path)
    worker = WorkerWrapperBase(0, config)
    try:
        description = worker.initialize()
        assert description["pipeline"] == "StableDiffusionPipeline"
        assert description["native_size"] == "512x512" and description["dtype"] == "bfloat16"
        assert sum(p.numel() for p in worker.pipeline.unet.parameters()) == 859_520_964
        # One step at 64x64 (an 8x8 latent) is enough to run every module once.
        (output,) = worker.generate([OmniDiffusionRequest("a red fox", 64, 64, num_inference_steps=1, seed=0)])
        assert output.error is None, output.error
        assert output.images[0].shape == (64, 64, 3)
    finally:
        worker.shutdown()
    assert list(tmp_path.iterdir()) == []  # built in memory, never saved
