"""Two Ray nodes on this machine (`ray start --head` and `ray start --address=...`), ranks pinned to each.

Each node has its own loopback address, temp dir, ports and custom resource, and is stopped by
the pid of the `ray start --block` that runs it (never `ray stop`, which would end every Ray on
the machine).
"""

from __future__ import annotations

import pytest
import ray
from helpers import poll, scheduling_by_default, two_ray_nodes

from engine import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def request_mode():
    """Request mode shards one step across the ranks on both nodes."""
    with scheduling_by_default("request"):
        yield

def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


@pytest.fixture(scope="module")
def two_nodes():
    """Head node on 127.0.0.2 offering 'head_node', worker node on 127.0.0.3 offering 'worker_node'."""
    with two_ray_nodes({"head_node": 1}, {"worker_node": 1}) as address:
        yield address


def node_ids_by_resource() -> dict[str, str]:
    return {
        resource: node["NodeID"]
        for node in alive_nodes()
        for resource in ("head_node", "worker_node")
        if node["Resources"].get(resource)
    }


def requests_for(seeds) -> list[OmniDiffusionRequest]:
    return [OmniDiffusionRequest("a red fox", num_inference_steps=4, seed=seed) for seed in seeds]


def test_ray_backend_pins_ranks_to_two_nodes_and_generates_through_both(two_nodes):
    assert not ray.is_initialized()
    config = OmniDiffusionConfig(
        model="tiny",
        num_gpus=2,
        distributed_executor_backend="ray",
        ray_address=two_nodes,
        ray_rank_resources=[{"head_node": 1}, {"worker_node": 1}],
    )
    with DiffusionEngine(config) as engine:
        # The executor joined the cluster at ray_address; both nodes are in it.
        poll(lambda: len(alive_nodes()) == 2, 60, "both Ray nodes to be alive")
        nodes = node_ids_by_resource()
        assert nodes["head_node"] != nodes["worker_node"]
        assert [info["node_id"] for info in engine.executor.worker_info] == [nodes["head_node"], nodes["worker_node"]]
        outputs = engine.step(requests_for(range(4)))
    assert [o.error for o in outputs] == [None] * 4
    assert [o.rank for o in outputs] == [0, 0, 1, 1]
    assert [o.images[0].size for o in outputs] == [(64, 64)] * 4
    # The engine opened the Ray connection, so closing it closed the connection too.
    assert not ray.is_initialized()
