"""torch.compile (--compile regional|full) on CPU with inductor (g++): the warm-up runs before the
server answers, switching the cache per request does not recompile, and a size the warm-up did not
cover still works and is counted in imagegen_recompiles. Tiny models, 64x64, 3 steps; even so each
server spends one to four minutes compiling on two busy cores."""

from __future__ import annotations

import openai
import pytest
from helpers import ServerProcess

pytestmark = pytest.mark.slow

COMMON = ("--device", "cpu", "--default-size", "64x64", "--default-num-inference-steps", "3")


def start(*flags: str) -> ServerProcess:
    # The worker compiles before its handshake, so the server answers nothing until the warm-up is done.
    return ServerProcess(*COMMON, *flags, ready_timeout_s=900)


@pytest.fixture(scope="module")
def regional():
    """Regional compile of the tiny UNet's transformer blocks, with PAB, batches of up to 2, on a CFG pair:
    each rank compiles the blocks for its half of the doubled batch (docs/parallelism.md)."""
    server = start(
        "--model", "tiny", "--compile", "regional", "--cache-method", "pab", "--max-batch-size", "2",
        "--num-gpus", "2", "--cfg-parallel-size", "2",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def full():
    """Full compile of the tiny Flux transformer, with TaylorSeer, warmed up at a second size too."""
    server = start(
        "--model", "tiny-flux", "--compile", "full", "--cache-method", "taylorseer", "--max-batch-size", "1",
        "--compile-warmup-sizes", "128x128",
    )
    yield server
    server.stop()


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def generate(server: ServerProcess, size: str = "64x64", n: int = 1, cache: bool = True) -> None:
    extra = {"seed": 1, "cache": cache}
    response = client(server).images.generate(prompt="a red fox", size=size, n=n, extra_body=extra)
    assert len(response.data) == n


def recompiles(server: ServerProcess) -> float:
    return server.metric("imagegen_recompiles_total")


@pytest.mark.parametrize("fixture, mode", [("regional", "regional"), ("full", "full")])
def test_compiled_server_is_warm_when_it_answers_and_reports_its_compile(fixture, mode, request):
    server = request.getfixturevalue(fixture)
    levers = client(server).models.list().data[0].model_extra["levers"]
    assert levers["compile"] == mode
    assert levers["warmup_compiled_graphs"] > 0 and levers["warmup_s"] > 0
    assert "imagegen_recompiles_total" in server.metrics()  # exported from the start


def test_switching_the_cache_per_request_does_not_recompile(regional):
    before = recompiles(regional)
    for cache, n in [(True, 1), (False, 1), (True, 2), (False, 2), (True, 1), (False, 1)]:
        generate(regional, n=n, cache=cache)
    assert recompiles(regional) == before


def test_a_size_the_warm_up_did_not_cover_recompiles_and_still_works(regional):
    before = recompiles(regional)
    generate(regional, size="128x128")
    assert recompiles(regional) > before


def test_warm_up_sizes_are_served_without_recompiling(full):
    before = recompiles(full)
    for size in ("64x64", "128x128"):
        for cache in (True, False):
            generate(full, size=size, cache=cache)
    assert recompiles(full) == before
