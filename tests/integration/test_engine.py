"""DiffusionEngine with real mp worker processes and the built-in tiny models."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import assert_pixels_close, child_pids, pid_alive, worker_pids_of

from engine import DiffusionEngine, EngineDeadError, OmniDiffusionConfig, OmniDiffusionRequest
from executors import RpcTimeoutError, WorkerRpcError

pytestmark = pytest.mark.slow


def requests_for(seeds, **fields):
    return [OmniDiffusionRequest("a red fox", num_inference_steps=4, seed=seed, **fields) for seed in seeds]


def pixels(output) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in output.images]


@pytest.fixture(scope="module")
def one_rank():
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=1)) as engine:
        yield engine


def test_step_returns_one_output_per_request_in_order(one_rank):
    requests = requests_for([3, 4, 5], num_images=2)
    outputs = one_rank.step(requests)
    assert [o.request_id for o in outputs] == [r.request_id for r in requests]
    for output, request in zip(outputs, requests):
        assert output.error is None
        assert output.seed == request.seed
        assert [image.size for image in output.images] == [(64, 64), (64, 64)]


def test_seed_is_filled_in_when_missing(one_rank):
    (output,) = one_rank.step([OmniDiffusionRequest("a fox", num_inference_steps=2)])
    assert isinstance(output.seed, int)
    (again,) = one_rank.step([OmniDiffusionRequest("a fox", num_inference_steps=2, seed=output.seed)])
    assert np.array_equal(pixels(output)[0], pixels(again)[0])


def test_invalid_request_gets_error_without_failing_the_step(one_rank):
    good, bad = requests_for([1, 2])[0], OmniDiffusionRequest("a fox", width=100, height=100, seed=1)
    outputs = one_rank.step([good, bad])
    assert outputs[0].error is None and len(outputs[0].images) == 1
    assert "100x100" in outputs[1].error and outputs[1].images == []


def test_mixed_sizes_in_one_step(one_rank):
    outputs = one_rank.step(requests_for([1], width=64, height=64) + requests_for([1], width=128, height=128))
    assert [o.images[0].size for o in outputs] == [(64, 64), (128, 128)]


def test_collective_rpc_reaches_every_rank_and_unique_reply_rank(one_rank):
    assert one_rank.collective_rpc("get_rank") == [0]
    assert one_rank.collective_rpc("get_rank", unique_reply_rank=0) == 0
    with pytest.raises(WorkerRpcError, match="no_such_method"):
        one_rank.collective_rpc("no_such_method")


def test_rpc_timeout_names_method_and_timeout(one_rank):
    big = requests_for(range(8))
    with pytest.raises(RpcTimeoutError, match=r"'generate' timed out after 0.01s"):
        one_rank.collective_rpc("generate", timeout=0.01, args=(big,))
    # The late reply is discarded and the worker keeps serving.
    assert one_rank.collective_rpc("get_rank") == [0]


def test_two_ranks_spread_a_step_and_match_one_rank(one_rank):
    requests = requests_for(range(10, 16))
    # Request mode shards one step's requests across the ranks (step mode sends each request where it runs at once).
    with DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=2, scheduling="request")) as two_ranks:
        assert len(child_pids(os.getpid())) >= 2
        assert two_ranks.collective_rpc("get_rank") == [0, 1]
        spread = two_ranks.step(requests)
    assert {output.rank for output in spread} == {0, 1}
    single = one_rank.step(requests)
    for a, b in zip(spread, single):
        assert_pixels_close(pixels(a)[0], pixels(b)[0])


def worker_pids() -> set[int]:
    return set(worker_pids_of(os.getpid()))


def test_close_is_idempotent_and_leaves_no_child_process():
    before = worker_pids()
    engine = DiffusionEngine(OmniDiffusionConfig(model="tiny", num_gpus=2))
    workers = worker_pids() - before
    assert len(workers) == 2
    engine.close()
    engine.close()
    assert not any(pid_alive(pid) for pid in workers)
    with pytest.raises(EngineDeadError):
        engine.step(requests_for([1]))
    with pytest.raises(EngineDeadError):
        engine.check_health()


def test_tiny_flux_generates():
    with DiffusionEngine(OmniDiffusionConfig(model="tiny-flux")) as engine:
        assert engine.model_info["pipeline"] == "FluxPipeline"
        a, b, c = engine.step(requests_for([1, 1, 2]))
    assert a.images[0].size == (64, 64)
    # The same seed at two places of one batch.
    assert_pixels_close(pixels(a)[0], pixels(b)[0])
    assert np.abs(pixels(a)[0] - pixels(c)[0]).mean() > 1


def test_tiny_sd3_generates_with_classifier_free_guidance():
    with DiffusionEngine(OmniDiffusionConfig(model="tiny-sd3")) as engine:
        assert engine.model_info["pipeline"] == "StableDiffusion3Pipeline"
        # A guidance scale above 1 turns on the pipeline's doubled (unconditional + conditional) batch.
        a, b, c = engine.step(requests_for([1, 1, 2], guidance_scale=4.0))
        replayed_a, _, _ = engine.step(requests_for([1, 1, 2], guidance_scale=4.0))
        (unguided,) = engine.step(requests_for([1], guidance_scale=1.0))
    assert a.images[0].size == (64, 64)
    assert np.array_equal(pixels(a)[0], pixels(replayed_a)[0])
    # The same seed at two places of one batch.
    assert_pixels_close(pixels(a)[0], pixels(b)[0])
    assert np.abs(pixels(a)[0] - pixels(c)[0]).mean() > 1
    assert np.abs(pixels(a)[0] - pixels(unguided)[0]).mean() > 1


def test_missing_model_fails_construction_with_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    before = worker_pids()
    with pytest.raises(Exception, match="no-such-model"):
        DiffusionEngine(OmniDiffusionConfig(model=str(missing)))
    assert not worker_pids() - before
