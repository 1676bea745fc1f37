"""Backend "ray" with no cluster given: the engine starts a private local Ray and ends it on close."""

from __future__ import annotations

import pytest
import ray

from engine import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest

pytestmark = pytest.mark.slow


def test_ray_backend_starts_and_stops_its_own_local_ray(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", distributed_executor_backend="ray")) as engine:
        assert ray.is_initialized()
        # A private Ray listens on loopback only.
        assert ray.get_runtime_context().gcs_address.startswith("127.")
        (output,) = engine.step([OmniDiffusionRequest("a red fox", num_inference_steps=4, seed=1)])
        assert output.error is None and output.images[0].size == (64, 64)
    assert not ray.is_initialized()
