"""Deployment files checked by real tools: hadolint, Docker Compose v2, Prometheus and promtool.

No Docker engine runs here, so images are not built; everything short of that is checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import ROOT, ServerProcess, free_port, poll

VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A tool from the test extras (in the virtualenv) or, for Prometheus, from Debian's packages."""
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it")
        pytest.skip(f"{name} is not installed (apt-get install prometheus / pip install -e '.[test]')")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]])
@pytest.mark.parametrize("profile", [None, "ray", "workers"])
def test_compose_config_is_valid(files, profile):
    command = [tool("docker-compose")]
    for file in files:
        command += ["-f", file]
    if profile:
        command += ["--profile", profile]
    result = subprocess.run([*command, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(subprocess.run([*command, "config"], cwd=ROOT, capture_output=True, text=True).stdout)
    imagegen = rendered["services"]["imagegen"]
    if "docker-compose.cpu.yml" in files:
        assert imagegen["build"]["target"] == "cpu" and "deploy" not in imagegen
    else:
        assert imagegen["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    if profile == "ray":
        assert rendered["services"]["ray-head"]["shm_size"]
        assert "--backend" in rendered["services"]["imagegen-ray"]["command"]
    if profile == "workers":
        services = rendered["services"]
        assert services["imagegen-grpc"]["command"][:2] == ["--backend", "grpc"]
        assert [services[f"imagegen-worker-{rank}"]["entrypoint"] for rank in (0, 1)] == [["imagegen", "worker"]] * 2


@pytest.fixture(scope="module")
def metrics_server():
    server = ServerProcess("--model", "tiny", "--served-model-name", "scraped")
    yield server
    server.stop()


def test_promtool_finds_nothing_wrong_with_our_metrics(metrics_server):
    assert metrics_server.post(num_inference_steps=2, model="scraped").status_code == 200
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=metrics_server.metrics(), capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_server_with_the_repo_config(metrics_server, tmp_path):
    # The repo's scrape config, pointed at the test server and scraping every second.
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "imagegen")
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{metrics_server.port}"]
    config["scrape_configs"] = [job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    # The series this test queries exist before the first scrape, whatever ran before it.
    assert metrics_server.post(num_inference_steps=2, model="scraped").status_code == 200
    port = free_port()
    prometheus = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def answers(path: str, **params: str) -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}{path}", params=params, timeout=5)
            except httpx.HTTPError:
                return None

        def ready() -> bool:
            if prometheus.poll() is not None:
                raise AssertionError(f"prometheus exited with {prometheus.returncode}")
            response = answers("/-/ready")
            return response is not None and response.status_code == 200

        def query(expr: str) -> float | None:
            response = answers("/api/v1/query", query=expr)
            assert response is not None and response.status_code == 200, response and response.text
            values = response.json()["data"]["result"]
            return float(values[0]["value"][1]) if values else None

        poll(ready, 60, "prometheus to be ready")
        poll(lambda: query('imagegen_images_generated_total{model_name="scraped"}') is not None, 60, "a first scrape")
        before = query('imagegen_images_generated_total{model_name="scraped"}')
        assert metrics_server.post(num_inference_steps=2, n=3, model="scraped").status_code == 200
        poll(lambda: query('imagegen_images_generated_total{model_name="scraped"}') == before + 3, 60, "the counter to move")
        assert query('imagegen_requests_total{model_name="scraped", endpoint="/v1/images/generations", status="200"}') >= 2
        assert query('up{job="imagegen"}') == 1
    finally:
        prometheus.terminate()
        prometheus.wait(30)
