"""A request that makes the pipeline raise fails alone, not with its batch (real worker, real pipeline)."""

from __future__ import annotations

import pytest
from helpers import assert_pixels_close

from engine import OmniDiffusionConfig, OmniDiffusionRequest
from workers import WorkerWrapperBase

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker():
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny", device="cpu"))
    worker.initialize()
    yield worker
    worker.shutdown()


def request(seed: int) -> OmniDiffusionRequest:
    return OmniDiffusionRequest("a fox", height=64, width=64, num_inference_steps=2, seed=seed)


def test_one_failing_request_does_not_fail_its_batch_mates(worker):
    # A seed past 64 bits makes torch.Generator raise inside the batched pipeline call.
    good, bad, also_good = request(1), request(2**70), request(3)
    outputs = worker.generate([good, bad, also_good])
    assert [o.request_id for o in outputs] == [good.request_id, bad.request_id, also_good.request_id]
    assert outputs[1].error is not None and "Overflow" in outputs[1].error and outputs[1].images == []
    for output, alone in zip((outputs[0], outputs[2]), worker.generate([good, also_good])):
        assert output.error is None
        assert_pixels_close(output.images[0], alone.images[0])


def test_worker_keeps_serving_after_a_failure(worker):
    worker.generate([request(2**70)])
    (output,) = worker.generate([request(5)])
    assert output.error is None and output.images[0].shape == (64, 64, 3)
