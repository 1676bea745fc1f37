"""deploy/kubernetes, validated offline and strictly against the Kubernetes schemas (kubernetes-validate),
then read back through our own CLI to check that the pods would start as configured.

No cluster runs here: `kubectl kustomize` renders the manifests (no server needed), and the
checks stop at what the API server's validation and our settings would say.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helpers import ROOT

from executors.grpc_external import expand_addresses
from server.cli import build_parser
from workers.config import OmniDiffusionConfig
from workers.hosts.grpc_server import check_listen_settings

KUBERNETES = ROOT / "deploy" / "kubernetes"
SECOND_GROUP = KUBERNETES / "overlays" / "second-group"
# The oldest and the newest Kubernetes we claim; grpc probes are stable since 1.27.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: str(path.relative_to(KUBERNETES)))
def test_every_manifest_is_valid_kubernetes(path, version):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def render(folder: Path) -> dict[tuple[str, str], dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed (its `kustomize` renders the overlays)")
        pytest.skip("kubectl is not installed")
    output = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(output)}


@pytest.fixture(scope="module")
def first_group() -> dict:
    return render(KUBERNETES)


@pytest.fixture(scope="module")
def second_group() -> dict:
    return render(SECOND_GROUP)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("folder", [KUBERNETES, SECOND_GROUP], ids=["first-group", "second-group"])
def test_rendered_kustomizations_are_valid_kubernetes(folder, version):
    for document in render(folder).values():
        kubernetes_validate.validate(document, version, strict=True)


def container_config(container: dict, settings: dict[str, str], secrets: dict[str, str], command: str):
    """The OmniDiffusionConfig that this container's command line and environment produce, the way
    `imagegen <command>` builds it (flags from our parser, IMAGEGEN_* from the environment)."""
    env = dict(settings)
    for variable in container.get("env", []):
        source = variable.get("valueFrom", {}).get("secretKeyRef")
        env[variable["name"]] = secrets[source["name"]] if source else variable["value"]
    args = build_parser().parse_args([command, *container.get("args", [])])
    flags = {name: value for name, value in vars(args).items() if name != "command"}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return OmniDiffusionConfig(**flags)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def shared_values(group: dict) -> tuple[dict, dict]:
    settings = group["ConfigMap", "imagegen-settings"]["data"]
    secrets = {"imagegen-worker-token": group["Secret", "imagegen-worker-token"]["stringData"]["token"]}
    return settings, secrets


def test_workers_and_server_of_a_group_fit_together(first_group):
    settings, secrets = shared_values(first_group)
    workers = first_group["StatefulSet", "imagegen-worker"]
    headless = first_group["Service", "imagegen-worker"]
    server = first_group["Deployment", "imagegen"]
    (worker,) = workers["spec"]["template"]["spec"]["containers"]
    (front,) = server["spec"]["template"]["spec"]["containers"]

    # Workers: one GPU each, as many as the ranks, found through the headless Service.
    worker_config = container_config(worker, settings, secrets, "worker")
    check_listen_settings(worker_config)  # 0.0.0.0 with a token: allowed
    assert (worker_config.worker_host, worker_config.worker_rank) == ("0.0.0.0", "auto")
    assert workers["spec"]["replicas"] == worker_config.num_gpus
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert workers["spec"]["serviceName"] == headless["metadata"]["name"] and headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= workers["spec"]["template"]["metadata"]["labels"].items()
    port = worker_config.worker_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == port, probe
    assert workers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > worker_config.rpc_timeout_s
    (mount,) = worker["volumeMounts"]
    assert mount["readOnly"] and mount["mountPath"] == "/models"
    assert ("PersistentVolumeClaim", workers["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"][
        "claimName"]) in first_group

    # Server: backend grpc at the StatefulSet's pods in rank order, with the workers' token and model.
    server_config = container_config(front, settings, secrets, "serve")
    assert server_config.distributed_executor_backend == "grpc"
    assert server_config.worker_token == worker_config.worker_token and server_config.model_name == worker_config.model_name
    name, service = workers["metadata"]["name"], headless["metadata"]["name"]
    assert expand_addresses(server_config.worker_addresses, server_config.num_gpus) == [
        f"{name}-{rank}.{service}.default.svc.cluster.local:{port}" for rank in range(workers["spec"]["replicas"])
    ]
    # Rank groups meet at their first pod's rendezvous port, whose name resolves before any pod is ready.
    rendezvous = next(p["containerPort"] for p in worker["ports"] if p["name"] == "rendezvous")
    assert worker_config.rank_group_address == f"{name}-{{leader}}.{service}.default.svc.cluster.local:{rendezvous}"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert front["livenessProbe"]["httpGet"]["path"] == "/health"
    assert front["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > server_config.shutdown_timeout_s
    annotations = server["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"
    assert "nvidia.com/gpu" not in str(front["resources"])


def test_a_second_group_has_its_own_names_and_workers_behind_the_same_service(first_group, second_group):
    settings, secrets = shared_values(first_group)
    # Only the group's own resources: the shared ones stay in the first build.
    assert set(second_group) == {
        ("StatefulSet", "imagegen-worker-b"), ("Service", "imagegen-worker-b"), ("Deployment", "imagegen-b")
    }
    workers = second_group["StatefulSet", "imagegen-worker-b"]
    (front,) = second_group["Deployment", "imagegen-b"]["spec"]["template"]["spec"]["containers"]
    server_config = container_config(front, settings, secrets, "serve")
    assert expand_addresses(server_config.worker_addresses, server_config.num_gpus) == [
        f"imagegen-worker-b-{rank}.imagegen-worker-b.default.svc.cluster.local:50051" for rank in range(2)
    ]
    (worker,) = workers["spec"]["template"]["spec"]["containers"]
    worker_config = container_config(worker, settings, secrets, "worker")
    assert worker_config.rank_group_address == "imagegen-worker-b-{leader}.imagegen-worker-b.default.svc.cluster.local:29500"
    # Each group's selectors see only its own pods ...
    selector = second_group["Service", "imagegen-worker-b"]["spec"]["selector"]
    first_pods = first_group["StatefulSet", "imagegen-worker"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= workers["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= first_pods.items()
    # ... and the shared HTTP Service sees both groups' servers.
    http = first_group["Service", "imagegen"]["spec"]["selector"]
    for group, name in ((first_group, "imagegen"), (second_group, "imagegen-b")):
        assert http.items() <= group["Deployment", name]["spec"]["template"]["metadata"]["labels"].items()
    # The references to shared resources keep their names.
    pod = workers["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "imagegen-models"
    assert pod["containers"][0]["envFrom"][0]["configMapRef"]["name"] == "imagegen-settings"
