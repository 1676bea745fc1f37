"""Two Ray nodes on this machine (`ray start --head` and `ray start --address=...`), ranks pinned to each.

Each node has its own loopback address, temp dir, ports and custom resource, and is stopped by
the pid of the `ray start --block` that runs it (never `ray stop`, which would end every Ray on
the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest
import ray
from helpers import RAY_ENV, ServerProcess, decode, free_port, poll, ray_test_environment

from engine import DiffusionEngine, OmniDiffusionConfig, OmniDiffusionRequest
from executors.ray_external import RayDiffusionWorkerActor

pytestmark = pytest.mark.slow

NAMESPACE = "imagegen-multinode"
RAY_CLI = str(Path(sys.executable).with_name("ray"))


class RayNode:
    """One `ray start --block` process; its Ray processes share its new session and go with it."""

    def __init__(self, ip: str, resource: str, head_address: str | None = None):
        self.ip = ip
        self.resource = resource
        self.temp_dir = tempfile.mkdtemp(prefix="imagegen-ray-node-")
        self.log_path = Path(self.temp_dir, "ray-start.log")
        flags = [
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={ip}",
            "--num-cpus=1",
            "--num-gpus=0",
            f"--resources={json.dumps({resource: 1})}",
            f"--temp-dir={self.temp_dir}",
            # Free ports for everything with a fixed default, so that nodes (and other Rays) never collide.
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        if head_address is None:
            self.port = free_port()
            self.address = f"{ip}:{self.port}"
            flags += [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            self.address = head_address
            flags += [f"--address={head_address}"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [RAY_CLI, *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **RAY_ENV},
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_started(self, timeout_s: float = 90) -> None:
        def started() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"ray start exited with {self.process.returncode}:\n{self.log()}")
            return "Ray runtime started" in self.log()

        poll(started, timeout_s, f"the Ray node on {self.ip}", interval_s=0.2)

    def stop(self) -> None:
        # SIGTERM lets `ray start --block` drain the node and end its Ray processes; the kill of
        # its own session is only for a node that does not go.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


@pytest.fixture(scope="module")
def two_nodes():
    """Head node on 127.0.0.2 offering 'head_node', worker node on 127.0.0.3 offering 'worker_node'."""
    with ray_test_environment():
        head = RayNode("127.0.0.2", "head_node")
        nodes = [head]
        try:
            head.wait_started()
            worker = RayNode("127.0.0.3", "worker_node", head_address=head.address)
            nodes.append(worker)
            worker.wait_started()
            yield head.address
        finally:
            if ray.is_initialized():
                ray.shutdown()
            for node in reversed(nodes):
                node.stop()


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


def test_guide_multi_node_actors_serve_http_through_ray_address_env(two_nodes):
    ray.init(address=two_nodes, namespace=NAMESPACE)
    config = OmniDiffusionConfig(model="tiny", num_gpus=2)
    # Create actors on different nodes, as the guide's multi-node example does.
    actor_0 = RayDiffusionWorkerActor.options(
        num_gpus=0, num_cpus=1, name="diffusion_worker_0", resources={"head_node": 1}
    ).remote(rank=0, od_config=config)
    actor_1 = RayDiffusionWorkerActor.options(
        num_gpus=0, num_cpus=1, name="diffusion_worker_1", resources={"worker_node": 1}
    ).remote(rank=1, od_config=config)
    server = None
    try:
        ready = ray.get([actor_0.initialize.remote(), actor_1.initialize.remote()])
        nodes = node_ids_by_resource()
        assert [r["node_id"] for r in ready] == [nodes["head_node"], nodes["worker_node"]]
        # The server finds the cluster through RAY_ADDRESS and the actors through the environment.
        server = ServerProcess(
            "--backend",
            "ray_external",
            "--ray-namespace",
            NAMESPACE,
            env={"RAY_ADDRESS": two_nodes, "DIFFUSION_WORKER_ACTOR_NAMES": "diffusion_worker_0,diffusion_worker_1"},
        )
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        response = client.images.generate(
            prompt="a red fox", size="64x64", extra_body={"seed": 3, "num_inference_steps": 4}
        )
        assert decode(response.data[0].b64_json).shape == (64, 64, 3)
    finally:
        if server is not None:
            server.stop()
        ray.kill(actor_0)
        ray.kill(actor_1)
        ray.shutdown()
