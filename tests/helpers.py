"""Start and stop real things for tests: a free port, an `imagegen serve` process, polling with deadlines."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
# The tests folder, for the test programs in it.
TESTS = ROOT / "tests"
RAY_CLI = str(Path(sys.executable).with_name("ray"))


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`imagegen ...` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# Token auth is on by default in recent Ray; usage stats would try to reach the internet.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def scheduling_by_default(mode: str):
    """The servers, workers and engines started inside run ``--scheduling mode`` unless told otherwise (each reads
    IMAGEGEN_SCHEDULING as it starts): for tests of one mode's own mechanics, such as request mode's batches that
    hold a worker busy, or its sharding of one step across ranks."""
    before = os.environ.get("IMAGEGEN_SCHEDULING")
    os.environ["IMAGEGEN_SCHEDULING"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("IMAGEGEN_SCHEDULING", None)
        else:
            os.environ["IMAGEGEN_SCHEDULING"] = before


@contextlib.contextmanager
def ray_test_environment():
    """RAY_ENV set and RAY_ADDRESS unset for the block, then the environment as it was."""
    saved = {name: os.environ.get(name) for name in [*RAY_ENV, "RAY_ADDRESS"]}
    os.environ.update(RAY_ENV)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def local_ray(num_cpus: int, namespace: str | None = None):
    """A private local Ray on a loopback address; yields its GCS address."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="imagegen-ray-")
    with ray_test_environment():
        # Ray maps 127.0.0.1 to the machine's routable address; 127.0.0.2 stays on loopback.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=0,
            include_dashboard=False,
            namespace=namespace,
            _node_ip_address="127.0.0.2",
            _temp_dir=temp_dir,
        )
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


_HANDED_OUT_PORTS: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now and not handed out before by this process: two ports picked before
    either is bound (a worker's and its rank group's) could otherwise be the same one."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT_PORTS:
            _HANDED_OUT_PORTS.add(port)
            return port
    raise AssertionError("no free port that was not handed out before")


def poll(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Wait until ``condition()`` is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def random_pixels(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """A uint8 HxWx3 image of uniform noise: an input image whose every pixel matters."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(b64_or_bytes: str | bytes) -> np.ndarray:
    import base64

    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# What docs/architecture.md promises for one seed across different batch compositions: a different
# batch size may round a value the other way (GEMM and convolution blockings differ by CPU), so
# each value stays within 1/255 and on average far closer. Replaying the same batch is bit for bit.
MAX_PIXEL_DIFF_ACROSS_BATCHES = 1
MAX_MEAN_PIXEL_DIFF_ACROSS_BATCHES = 0.02


def assert_pixels_close(a, b) -> None:
    """Pixels of one seed made in different batch compositions (or on different backends): each
    uint8 value within MAX_PIXEL_DIFF_ACROSS_BATCHES, their mean difference within MAX_MEAN_..."""
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    difference = np.abs(a - b)
    assert difference.max() <= MAX_PIXEL_DIFF_ACROSS_BATCHES, f"max |diff| {difference.max()} over 1/255"
    assert difference.mean() <= MAX_MEAN_PIXEL_DIFF_ACROSS_BATCHES, f"mean |diff| {difference.mean():.4f} too large"


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG of a few hundred bytes whose header claims width x height pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # Field 4 is the parent pid; the command name (field 2) may hold spaces, so split after it.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def worker_pids_of(pid: int) -> list[int]:
    """The mp worker programs (``python -m workers.hosts.process``) among ``pid``'s children."""
    workers = []
    for child in child_pids(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"workers.hosts.process" in command.split(b"\0"):
            workers.append(child)
    return workers


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Debian's packages (apt-get install chromium chromium-driver; .ci/run does it).
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900):
    """Debian's Chromium, headless, driven by Debian's chromedriver through Selenium.

    The driver's path is given, so Selenium Manager is never asked for one (SE_OFFLINE makes sure
    it would not download anything either). Every host name but 127.0.0.1 fails to resolve: the
    pages must work with no network.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    profile = tempfile.mkdtemp(prefix="imagegen-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root, Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def metric_samples(text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


class RayNode:
    """One `ray start --block` process; its Ray processes share its new session and go with it."""

    def __init__(self, ip: str, resources: dict[str, float], head_address: str | None = None, num_cpus: int = 1):
        self.ip = ip
        self.temp_dir = tempfile.mkdtemp(prefix="imagegen-ray-node-")
        self.log_path = Path(self.temp_dir, "ray-start.log")
        flags = [
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={ip}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
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


@contextlib.contextmanager
def two_ray_nodes(head_resources: dict[str, float], worker_resources: dict[str, float], num_cpus: int = 1):
    """A head node on 127.0.0.2 and a worker node on 127.0.0.3 (this machine, loopback only), each
    offering its custom resources; yields the head's address. The driver, if any, is shut down first."""
    import ray

    with ray_test_environment():
        head = RayNode("127.0.0.2", head_resources, num_cpus=num_cpus)
        nodes = [head]
        try:
            head.wait_started()
            worker = RayNode("127.0.0.3", worker_resources, head_address=head.address, num_cpus=num_cpus)
            nodes.append(worker)
            worker.wait_started()
            yield head.address
        finally:
            if ray.is_initialized():
                ray.shutdown()
            for node in reversed(nodes):
                node.stop()


def stop_gracefully(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGINT, the graceful stop of `imagegen serve` and `imagegen worker`; SIGKILL after ``timeout_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ServerProcess:
    """`python -m server.cli serve ...` on a free loopback port, stopped by the test that started it."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None, ready_timeout_s: float = 120):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: nobody reads a pipe while the test runs, and a full one blocks the server.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="imagegen-server-", suffix=".log")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), *flags],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll(up, timeout_s, "the server to answer /health", interval_s=0.2)

    def output(self) -> str:
        with open(self.log.name) as log:
            return log.read()

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        samples = metric_samples(self.metrics(), name)
        return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))

    def worker_pids(self) -> list[int]:
        return worker_pids_of(self.process.pid)

    def post(self, timeout: float = 120, headers: dict | None = None, **body) -> httpx.Response:
        body.setdefault("prompt", "a red fox")
        body.setdefault("size", "64x64")
        return httpx.post(f"{self.base_url}/v1/images/generations", json=body, timeout=timeout, headers=headers)

    def stop(self) -> None:
        stop_gracefully(self.process, 30)
        self.log.close()


# The key of the `keyed_server` fixture.
TEST_API_KEY = "imagegen-test-key"
# The admin key (IMAGEGEN_ADMIN_API_KEY) of the servers whose tests load and unload LoRA adapters.
ADMIN_KEY = "lora-admin-key"


def admin(server: "ServerProcess", route: str, key: str | None = ADMIN_KEY, **body) -> httpx.Response:
    """POST ``body`` to the admin ``route`` (load_lora_adapter, unload_lora_adapter) with ``key``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}/v1/{route}", json=body, headers=headers, timeout=120)
# A request that runs until its client hangs up, on a server whose max_num_inference_steps allows it.
ENDLESS_STREAM = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 100000, "stream": True, "progress": True}


@contextlib.contextmanager
def queue_held_full(server: ServerProcess, headers: dict | None = None, timeout_s: float = 120):
    """One request runs until the block ends and one waits behind it: on a server with
    --max-queue-size 1, every other request meanwhile is 429. Afterwards both are done."""
    url = f"{server.base_url}/v1/images/generations"
    client = httpx.Client(timeout=timeout_s, headers=headers)
    running = client.send(client.build_request("POST", url, json=ENDLESS_STREAM), stream=True)
    assert running.status_code == 200  # its first progress event came: it is running
    short = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2}
    waiting = threading.Thread(target=lambda: httpx.post(url, json=short, headers=headers, timeout=timeout_s))
    waiting.start()
    try:
        poll(lambda: server.metric("imagegen_num_requests_waiting") == 1, 60, "the second request to queue")
        yield
    finally:
        running.close()  # the running request stops at its next step; the waiting one runs
        client.close()
        waiting.join(timeout_s)


class WorkerProcess:
    """`python -m server.cli worker ...` (or ``program``'s ``worker ...``) on a free loopback port (or
    ``port``), stopped by the test."""

    def __init__(self, rank: int, *flags: str, port: int | None = None, env: dict[str, str] | None = None,
                 wait: bool = True, ready_timeout_s: float = 180, program: tuple[str, ...] = ("-m", "server.cli")):
        self.rank = rank
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"imagegen-worker{rank}-", suffix=".log")
        self.process = subprocess.Popen(
            [sys.executable, *program, "worker", "--port", str(self.port), "--rank", str(rank), *flags],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_serving(ready_timeout_s)

    def health(self, timeout: float = 2, port: int | None = None) -> str:
        """The grpc.health.v1 status name, or the gRPC error code's name when the call failed."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port or self.port}") as channel:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError as error:
                return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def wait_serving(self, timeout_s: float = 180, port: int | None = None) -> None:
        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}: {self.output()}")
            return self.health(port=port) == "SERVING"

        poll(serving, timeout_s, f"worker rank {self.rank} to report SERVING", interval_s=0.2)

    def output(self) -> str:
        with open(self.log.name) as log:
            return log.read()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        stop_gracefully(self.process, 60)
        self.log.close()


def start_workers(num_ranks: int, *flags: str, env: dict[str, str] | None = None) -> list[WorkerProcess]:
    """``num_ranks`` workers of one group, started at once, each waited for until SERVING."""
    flags = ("--num-gpus", str(num_ranks), *flags)
    workers = [WorkerProcess(rank, *flags, env=env, wait=False) for rank in range(num_ranks)]
    try:
        for worker in workers:
            worker.wait_serving()
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers
