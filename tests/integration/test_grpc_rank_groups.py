"""A CFG pair of real `imagegen worker` processes (backend grpc): their owner starts them with the
group settings, the group outlives the servers that use it, and a dead rank takes its group down."""

from __future__ import annotations

import concurrent.futures
import threading

import grpc
import numpy as np
import pytest
from helpers import WorkerProcess, assert_pixels_close, free_port, start_workers

from engine import DiffusionEngine, EngineDeadError, OmniDiffusionConfig, OmniDiffusionRequest
from executors import WorkerStartupError
from workers.data import StepProgress
from workers.hosts.proto import worker_pb2 as pb
from workers.hosts.proto import worker_pb2_grpc as pb_grpc
from workers.worker import WorkerWrapperBase

pytestmark = pytest.mark.slow


def pair_flags() -> tuple[str, ...]:
    """What the owner passes both workers of one CFG pair: the pair's shape and where its leader listens."""
    return ("--model", "tiny", "--cfg-parallel-size", "2", "--rank-group-address", f"127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def pair():
    workers = start_workers(2, *pair_flags())
    yield workers
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="module")
def alone():
    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny", device="cpu"))
    worker.initialize()
    return worker


def grpc_config(workers, **settings) -> OmniDiffusionConfig:
    return OmniDiffusionConfig(
        model="tiny",
        distributed_executor_backend="grpc",
        num_gpus=len(workers),
        worker_addresses=[worker.address for worker in workers],
        **{"cfg_parallel_size": 2, **settings},
    )


def guided(seed: int, **fields) -> OmniDiffusionRequest:
    return OmniDiffusionRequest("a red fox", 64, 64, seed=seed, **{"num_inference_steps": 4, "guidance_scale": 6.0, **fields})


def test_a_grpc_cfg_pair_makes_the_pixels_of_one_rank(pair, alone):
    requests = [guided(1), guided(2)]
    with DiffusionEngine(grpc_config(pair)) as engine:
        outputs = engine.step(requests)
        references = alone.generate([engine.prepare(r) for r in requests])
    for output, reference in zip(outputs, references):
        assert output.error is None and output.rank == 0
        assert_pixels_close(np.asarray(output.images[0]), reference.images[0])


def test_a_cancel_that_reaches_one_rank_only_stops_the_pair_as_one(pair, alone):
    long = guided(3, num_inference_steps=150, progress=True)
    second_step = threading.Event()

    def on_progress(progress) -> None:
        if isinstance(progress, StepProgress) and progress.step >= 2:
            second_step.set()

    # A second server on the same pair: the group was formed when its workers started, not by a server.
    with DiffusionEngine(grpc_config(pair)) as engine, concurrent.futures.ThreadPoolExecutor(1) as pool:
        engine.progress_listeners.append(on_progress)
        step = pool.submit(engine.step, [long])
        assert second_step.wait(120)
        # Only rank 1 hears of it, as when the cancel to rank 0 is late: rank 0 must stop at the same step.
        with grpc.insecure_channel(pair[1].address) as channel:
            pb_grpc.DiffusionWorkerStub(channel).Cancel(pb.CancelRequest(request_ids=[long.request_id]), timeout=10)
        (output,) = step.result(timeout=120)
        assert output.images == [] and "cancelled" in output.error
        after = guided(4)
        (served,) = engine.step([after])
        (reference,) = alone.generate([engine.prepare(after)])
    assert_pixels_close(np.asarray(served.images[0]), reference.images[0])


def test_a_server_with_other_group_settings_is_refused_at_start_up(pair):
    with pytest.raises(WorkerStartupError, match=r"started with rank groups of .* = 2 x 1 x 1 but this server has 1 x 1 x 1"):
        DiffusionEngine(grpc_config(pair, cfg_parallel_size=1))


def test_a_dead_rank_takes_its_group_down_and_the_restarted_pair_forms_again(alone):
    flags = pair_flags()
    workers = start_workers(2, *flags)
    try:
        engine = DiffusionEngine(grpc_config(workers))
        workers[1].kill()
        with pytest.raises(EngineDeadError, match="rank 1"):
            engine.step([guided(5)])
        # The survivor's collective failed: it leaves (exit code 1) for its owner to start again.
        assert workers[0].process.wait(60) == 1
        assert "leaves" in workers[0].output()
        # The owner starts the group again on the same addresses; the server reconnects to both.
        workers = [WorkerProcess(rank, "--num-gpus", "2", *flags, port=w.port, wait=False) for rank, w in enumerate(workers)]
        for worker in workers:
            worker.wait_serving()
        request = guided(6)
        (output,) = engine.step([request])
        (reference,) = alone.generate([engine.prepare(request)])
        assert_pixels_close(np.asarray(output.images[0]), reference.images[0])
        engine.close()
    finally:
        for worker in workers:
            worker.stop()
