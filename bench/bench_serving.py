"""Serving benchmark: the raw diffusers pipeline vs a naive FastAPI server vs `imagegen serve`, in one run.

Every number is measured in this run on this machine and printed as ratios against the raw
pipeline (and, for the other backends, against `imagegen serve` on mp), so results from different
machines are never mixed. Loopback only; bounded counts. See docs/benchmarks.md.

    python bench/bench_serving.py                        # tiny model, 64x64, 4 steps, CPU
    python bench/bench_serving.py --size 512 --device cuda
    python bench/bench_serving.py --backends mp,grpc     # without the Ray backends
    python bench/bench_serving.py --size 128 --backends mp,mp_cfg_parallel   # a CFG pair vs one rank

--workload mixed|uniform measures scheduling instead (issue 17): 16 clients against `imagegen serve
--scheduling request`, `--scheduling step` (backend mp) and LitServe's dynamic batching
(bench/litserve_server.py, the `bench` extra), each request 4 steps with probability 0.8 and 40 otherwise
(mixed; one seeded sequence for every server) or all 4 steps (uniform). It prints p50 and p99 of the
short and of the long requests, images/s, the CPU milliseconds per image of the server process and of its
workers over the load (from /proc; imagegen only), and step mode's ratios against the other two.

    python bench/bench_serving.py --workload mixed --requests-per-client 10
    python bench/bench_serving.py --workload uniform --size 256 --requests-per-client 2

--workload pixels measures what serving costs the CPU per image once the pixels exist (issue 27): `imagegen
serve` (backend mp) at 1 and then 4 clients (--pixels-clients), 1 denoising step, large images. From /proc it reads
the CPU seconds of the server process and of its worker processes over each load, and the server's idle CPU rate
(per thread, to the ns) over a window before the load, and reports the server's CPU per image raw and with idle rate
x elapsed subtracted, the workers' CPU per image and the p50. Its baseline row is the raw pipeline plus one Pillow
PNG write (level 1) in one process. --imagegen-root runs the server of another checkout (e.g. main) with this bench,
for before/after.

    python bench/bench_serving.py --workload pixels --model demo --size 1024 --steps 1

--workload models measures several models behind one server (issue 24, bench/bench_models.py): two models at
50/50, 8 clients, in one `imagegen serve` against the two in two single-model servers at once (4 clients each),
and each model's load time against the latency of a request that must load it first.

    python bench/bench_serving.py --workload models --models demo,tiny --size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def p50_p99_ms(latencies: list[float]) -> tuple[float, float]:
    return 1000 * statistics.median(latencies), 1000 * percentile(latencies, 99)


def summary(name: str, images: int, elapsed: float, latencies: list[float]) -> dict:
    p50, p99 = p50_p99_ms(latencies)
    return {"name": name, "images_per_s": images / elapsed, "p50_ms": p50, "p99_ms": p99}


# -- raw pipeline ------------------------------------------------------------------------------
def raw_pipeline(args):
    """``args.model``'s pipeline in this process on ``args.device``, and that device. Loaded as a worker loads it: a
    folder's model from disk, a random-weight one (random-sdxl) built on the device."""
    from workers.models.catalog import load_pipeline
    from workers.runtime.pipelines import resolve_device, resolve_dtype

    device = resolve_device(args.device, 0)
    pipeline = load_pipeline(args.model, args.cache_dir, resolve_dtype("auto", device), device).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, device


def bench_raw(args) -> list[dict]:
    import torch

    pipeline, device = raw_pipeline(args)

    def call(batch: int, seed: int) -> None:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        pipeline(
            prompt=["a red fox"] * batch, height=args.size, width=args.size,
            num_inference_steps=args.steps, generator=generators, output_type="np",
        )
        if device.type == "cuda":
            torch.cuda.synchronize()

    results = []
    for batch, calls in ((1, args.raw_calls), (8, max(3, args.raw_calls // 4))):
        call(batch, 0)  # warm-up
        latencies = []
        started = time.perf_counter()
        for i in range(calls):
            t0 = time.perf_counter()
            call(batch, i)
            latencies.append(time.perf_counter() - t0)
        results.append(summary(f"raw pipeline, batch {batch}", batch * calls, time.perf_counter() - started, latencies))
    pipeline = None  # frees the weights before the servers load theirs (call() holds the name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# -- HTTP servers --------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, log: Path, timeout_s: float = 300, cwd: Path = ROOT) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[2:4]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{command} did not become healthy")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def load(
    port: int, size: int, plan: list[list[int]], after_warm_up: Callable[[], None] = lambda: None
) -> tuple[float, dict[int, list[float]]]:
    """One client thread per entry of ``plan``, each sending its requests' step counts one after another.

    Returns the seconds all clients took and the latencies by step count. The last client's
    requests run alone first, as a warm-up; ``after_warm_up()`` runs once it is over.
    """
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    latencies: dict[int, list[float]] = {steps: [] for steps in set().union(*plan)}
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=900) as http:
            for i, steps in enumerate(plan[index]):
                body = {"prompt": "a red fox", "size": f"{size}x{size}", "num_inference_steps": steps,
                        "seed": (index + 1) * 1000 + i}
                t0 = time.perf_counter()
                response = http.post(url, json=body)
                elapsed = time.perf_counter() - t0
                response.raise_for_status()
                with lock:
                    latencies[steps].append(elapsed)

    client(-1)  # warm-up
    for samples in latencies.values():
        samples.clear()
    after_warm_up()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(client, range(len(plan))))
    return time.perf_counter() - started, latencies


def single_load(name: str, port: int, args, clients: int, requests_per_client: int) -> dict:
    elapsed, latencies = load(port, args.size, [[args.steps] * requests_per_client] * clients)
    result = summary(f"{name}, {clients} client(s)", clients * requests_per_client, elapsed, latencies[args.steps])
    return {**result, "clients": clients}


def bench_server(name: str, command: list[str], port: int, args, logs: Path) -> list[dict]:
    # imagegen's own server runs from --imagegen-root (this checkout unless given); the peers from this one.
    cwd = args.imagegen_root if "server.cli" in command else ROOT
    process = start(command, port, logs / f"{name.replace(' ', '-')}.log", cwd=cwd)
    try:
        if args.workload != "single":
            return [workload_load(name, port, args, process.pid)]
        return [
            single_load(name, port, args, 1, args.single_requests),
            single_load(name, port, args, 16, args.requests_per_client),
        ]
    finally:
        stop(process)


def peer_command(script: str, port: int, args) -> list[str]:
    """A peer server in bench/ (naive_server.py, litserve_server.py) on ``port``, with the model and device."""
    return [sys.executable, str(ROOT / "bench" / script), "--port", str(port), "--model", args.model,
            "--device", args.device]


def attempt(failed: list[str], name: str, measure) -> list[dict]:
    """``measure()``'s rows; if it raises, none and a line in ``failed``, so that the other servers'
    numbers are still reported (the server's own log is in the logs folder)."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - reported as one line
        last_line = (str(error).strip().splitlines() or [repr(error)])[-1]
        failed.append(f"{name} failed: {last_line}")
        return []


# -- imagegen serve on each backend ---------------------------------------------------------------
BACKENDS = ("mp", "ray", "ray_external", "grpc")
# mp with every rank doubled into a CFG pair (--cfg-parallel-size 2): on CPU, 2 ranks x half the threads
# each against mp's 1 rank x all of them.
EXTRA_BACKENDS = ("mp_cfg_parallel",)


def use_gpus(args) -> bool:
    from workers.runtime.pipelines import resolve_device

    return resolve_device(args.device, 0).type == "cuda"


def cpus_per_rank(args) -> int:
    # What mp gives each rank (its share of the cores); the Ray actors reserve the same, since an
    # actor runs one torch thread per CPU it reserved.
    return max(1, (os.cpu_count() or 1) // args.num_gpus)


@contextlib.contextmanager
def external_actors(args):
    """A private local Ray with one named, initialized worker actor per rank, for backend ray_external.

    Yields the server flags that find them. Ray runs only inside this block, so its driver holds no
    CPU while the other parts are measured; on exit the actors are killed and that Ray is stopped.
    """
    import ray

    from executors.ray_external import RayDiffusionWorkerActor
    from workers.config import OmniDiffusionConfig

    gpus = use_gpus(args)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, namespace="bench",
             _node_ip_address="127.0.0.2")
    actors = []
    try:
        config = OmniDiffusionConfig(model=args.model, num_gpus=args.num_gpus, device=args.device,
                                     max_batch_size=args.max_batch_size)
        names = [f"bench_rank_{rank}" for rank in range(args.num_gpus)]
        # The same resources backend ray reserves per rank: one GPU, or this rank's share of the CPUs.
        options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_gpus": 0, "num_cpus": cpus_per_rank(args)}
        actors = [
            RayDiffusionWorkerActor.options(name=name, **options).remote(rank=rank, od_config=config)
            for rank, name in enumerate(names)
        ]
        for reply in ray.get([actor.initialize.remote() for actor in actors]):
            if reply.get("status") != "ready":
                raise RuntimeError(f"worker actor did not start: {reply}")
        yield ["--worker-actor-names", ",".join(names), "--ray-address", ray.get_runtime_context().gcs_address,
               "--ray-namespace", "bench"]
    finally:
        for actor in actors:
            ray.kill(actor)
        ray.shutdown()


def wait_serving(port: int, process: subprocess.Popen, log: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 300
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"imagegen worker exited: {log.read_text()[-2000:]}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"imagegen worker on port {port} did not report SERVING")


@contextlib.contextmanager
def grpc_workers(args, logs: Path):
    """One `imagegen worker` per rank on a loopback port, for backend grpc; yields the server flags that find them.

    They run only inside this block, each with its share of the cores (as mp's workers), and get
    SIGTERM (then SIGKILL) at its end.
    """
    ports = [free_port() for _ in range(args.num_gpus)]
    workers: list[subprocess.Popen] = []
    try:
        for rank, port in enumerate(ports):
            command = [sys.executable, "-m", "server.cli", "worker", "--port", str(port), "--rank", str(rank),
                       "--num-gpus", str(args.num_gpus), "--model", args.model, "--device", args.device]
            log = logs / f"grpc-worker-{rank}.log"
            workers.append(subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT))
        for rank, (port, process) in enumerate(zip(ports, workers)):
            wait_serving(port, process, logs / f"grpc-worker-{rank}.log")
        yield ["--worker-addresses", ",".join(f"127.0.0.1:{port}" for port in ports)]
    finally:
        for process in workers:
            stop(process)


def imagegen_command(backend: str, port: int, args) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", args.model,
            "--device", args.device, "--max-batch-size", str(args.max_batch_size), "--num-gpus", str(args.num_gpus),
            "--backend", backend]


def bench_imagegen(backend: str, args, logs: Path) -> list[dict]:
    port = free_port()
    command = imagegen_command(backend, port, args)
    name = f"imagegen {backend}"
    if backend == "mp_cfg_parallel":
        command[command.index("--num-gpus") + 1] = str(2 * args.num_gpus)
        command[command.index("--backend") + 1] = "mp"
        return bench_server("imagegen cfg-parallel 2 (mp)", command + ["--cfg-parallel-size", "2"], port, args, logs)
    if backend == "ray":
        # No --ray-address: the server starts a private Ray and stops it when it closes.
        return bench_server(name, command + ["--ray-cpus-per-worker", str(cpus_per_rank(args))], port, args, logs)
    if backend == "ray_external":
        with external_actors(args) as flags:
            return bench_server(name, command + flags, port, args, logs)
    if backend == "grpc":
        with grpc_workers(args, logs) as flags:
            return bench_server(name, command + flags, port, args, logs)
    return bench_server(name, command, port, args, logs)


def parse_backends(value: str) -> list[str]:
    backends = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in backends if name not in BACKENDS + EXTRA_BACKENDS]
    if unknown or not backends:
        raise argparse.ArgumentTypeError(
            f"backends are a comma-separated subset of {','.join(BACKENDS + EXTRA_BACKENDS)}"
        )
    return backends


def add_ratios(results: list[dict]) -> None:
    """x raw b8 and p50 - raw b1 for every row; x mp (same client count) for every imagegen row."""
    by_name = {r["name"]: r for r in results}
    raw1, raw8 = by_name["raw pipeline, batch 1"], by_name["raw pipeline, batch 8"]
    mp = {r["clients"]: r for r in results if r["name"].startswith("imagegen mp,")}
    for r in results:
        r["x_raw_b8"] = r["images_per_s"] / raw8["images_per_s"]
        r["p50_minus_raw_b1_ms"] = r["p50_ms"] - raw1["p50_ms"]
        if r["name"].startswith("imagegen ") and r["clients"] in mp:
            r["x_mp"] = r["images_per_s"] / mp[r["clients"]]["images_per_s"]


# -- scheduling workloads (issue 17) ----------------------------------------------------------------
SHORT_STEPS, LONG_STEPS, SHORT_SHARE = 4, 40, 0.8
WORKLOAD_CLIENTS = 16
WORKLOAD_COLUMNS = {"images_per_s": "images/s", "short_p50_ms": "short p50", "short_p99_ms": "short p99",
                    "long_p50_ms": "long p50", "long_p99_ms": "long p99", "server_cpu_ms_per_image": "server CPU",
                    "workers_cpu_ms_per_image": "worker CPU"}


def workload_plan(args) -> list[list[int]]:
    """Each client's step counts, in order: the same for every server, from --workload-seed."""
    if args.workload == "uniform":
        return [[SHORT_STEPS] * args.requests_per_client for _ in range(WORKLOAD_CLIENTS)]
    chooser = random.Random(args.workload_seed)
    return [
        [SHORT_STEPS if chooser.random() < SHORT_SHARE else LONG_STEPS for _ in range(args.requests_per_client)]
        for _ in range(WORKLOAD_CLIENTS)
    ]


def workload_load(name: str, port: int, args, pid: int) -> dict:
    """The workload's row for the server ``pid``: images/s, latencies, and the CPU seconds per image of the
    server and of its workers (from /proc; on a machine shared with other work, a steadier figure of the
    per-request overhead than images/s, which moves with the CPU share the server gets)."""
    plan = workload_plan(args)
    workers = children_of(pid)
    cpu_before: list[tuple[float, float]] = []

    def cpu_now() -> tuple[float, float]:
        return cpu_seconds(pid), sum(map(cpu_seconds, workers))

    elapsed, latencies = load(port, args.size, plan, lambda: cpu_before.append(cpu_now()))
    images = sum(map(len, plan))
    (server_before, workers_before), (server_after, workers_after) = cpu_before[0], cpu_now()
    row = {
        "name": name,
        "images_per_s": images / elapsed,
        "server_cpu_ms_per_image": 1000 * (server_after - server_before) / images,
        "workers_cpu_ms_per_image": 1000 * (workers_after - workers_before) / images,
    }
    for steps, kind in ((SHORT_STEPS, "short"), (LONG_STEPS, "long")):
        if latencies.get(steps):
            row[f"{kind}_p50_ms"], row[f"{kind}_p99_ms"] = p50_p99_ms(latencies[steps])
    return row


def bench_workload(args, logs: Path, failed: list[str]) -> list[dict]:
    """imagegen on mp with each scheduling, then LitServe, one after another on the same plan."""
    rows = []
    for scheduling in ("request", "step"):
        port = free_port()
        command = imagegen_command("mp", port, args) + ["--scheduling", scheduling]
        name = f"imagegen {scheduling}"
        rows += attempt(failed, name, functools.partial(bench_server, name, command, port, args, logs))
    if importlib.util.find_spec("litserve") is None:
        failed.append("litserve skipped: not installed (pip install -e '.[bench]')")
        return rows
    port = free_port()
    command = peer_command("litserve_server.py", port, args) + ["--max-batch-size", str(args.max_batch_size)]
    return rows + attempt(failed, "litserve", functools.partial(bench_server, "litserve", command, port, args, logs))


def workload_ratios(rows: list[dict]) -> list[dict]:
    """step / request and step / litserve, column by column, for the rows that were measured."""
    by_name = {row["name"]: row for row in rows}
    step = by_name.get("imagegen step")
    ratios = []
    for other in ("imagegen request", "litserve"):
        if step and other in by_name:
            ratio = {column: step[column] / by_name[other][column] for column in WORKLOAD_COLUMNS if column in step}
            ratios.append({"name": f"step / {other.removeprefix('imagegen ')}", **ratio})
    return ratios


def print_workload(args, rows: list[dict], ratios: list[dict]) -> None:
    plan = workload_plan(args)
    long = sum(steps.count(LONG_STEPS) for steps in plan)
    print(f"workload={args.workload} clients={WORKLOAD_CLIENTS} requests={sum(map(len, plan))} ({long} of "
          f"{LONG_STEPS} steps, the rest {SHORT_STEPS}) max batch {args.max_batch_size}")
    columns = [column for column in WORKLOAD_COLUMNS if any(column in row for row in rows)]
    header = "".join(f"{WORKLOAD_COLUMNS[column]:>11}" for column in columns)
    print(f"{'':20}{header}   (p50, p99: ms; CPU: ms per image)")
    for row in rows:
        print(f"{row['name']:20}" + "".join(f"{row[column]:11.1f}" if column in row else f"{'':11}"
                                            for column in columns))
    for ratio in ratios:
        print(f"{ratio['name']:20}" + "".join(f"{ratio[column]:11.2f}" if column in ratio else f"{'':11}"
                                              for column in columns))


# -- what serving costs the CPU per image (issue 27) ------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/<pid>/stat), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> float:
    """CPU seconds of the threads of ``pid`` alive now, to the nanosecond (/proc/<pid>/task/*/schedstat). Over a
    window in which no thread ends (the idle window) it is exact where /proc/<pid>/stat counts 10 ms ticks, which
    over a 10 s window is +-1 ms per s, and the idle rate is multiplied by a load's tens of seconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the server's worker processes)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(child) for child in (task / "children").read_text().split()]
                found += children
                frontier += children
    return found


def pixels_request(port: int, args, clients: int, requests_per_client: int) -> tuple[float, list[float]]:
    """``clients`` threads, each sending its requests one after another; the seconds they took, the latencies."""
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=1800) as http:
            for i in range(requests_per_client):
                body = {"prompt": "a red circle on a white background", "size": f"{args.size}x{args.size}",
                        "num_inference_steps": args.steps, "seed": index * 1000 + i}
                t0 = time.perf_counter()
                http.post(url, json=body).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - started, latencies


def bench_pixels_server(args, logs: Path) -> list[dict]:
    port = free_port()
    command = imagegen_command("mp", port, args)
    name = "imagegen mp" + (f" ({args.imagegen_root.name})" if args.imagegen_root != ROOT else "")
    process = start(command, port, logs / "pixels-server.log", cwd=args.imagegen_root)
    try:
        workers = children_of(process.pid)
        pixels_request(port, args, 1, 1)  # warm-up
        # The server's own CPU while nothing is asked of it (its event loop, metrics, health threads).
        idle_started, idle_cpu = time.perf_counter(), thread_cpu_seconds(process.pid)
        time.sleep(args.idle_window_s)  # a measurement window, not synchronisation
        idle_rate = (thread_cpu_seconds(process.pid) - idle_cpu) / (time.perf_counter() - idle_started)
        rows = []
        for clients in args.pixels_clients:
            per_client = args.pixels_requests if clients == 1 else max(1, args.pixels_requests // clients)
            server_before, workers_before = cpu_seconds(process.pid), sum(map(cpu_seconds, workers))
            elapsed, latencies = pixels_request(port, args, clients, per_client)
            server_cpu = cpu_seconds(process.pid) - server_before
            images = clients * per_client
            rows.append({
                "name": f"{name}, {clients} client(s)", "clients": clients, "images": images,
                "images_per_s": images / elapsed, "p50_ms": 1000 * statistics.median(latencies),
                "server_cpu_ms_per_image": 1000 * server_cpu / images,
                "server_cpu_ms_per_image_less_idle": 1000 * (server_cpu - idle_rate * elapsed) / images,
                "workers_cpu_ms_per_image": 1000 * (sum(map(cpu_seconds, workers)) - workers_before) / images,
                "server_idle_cpu_ms_per_s": 1000 * idle_rate,
            })
        return rows
    finally:
        stop(process)


def bench_pixels_baseline(args) -> dict:
    """The raw pipeline plus one Pillow PNG write (level 1) per image, in this process: its CPU per image."""
    import io

    import torch
    from PIL import Image

    from workers.runtime.stages import to_uint8

    pipeline, _ = raw_pipeline(args)

    def one(seed: int) -> bytes:
        images = pipeline(prompt=["a red circle on a white background"], height=args.size, width=args.size,
                          num_inference_steps=args.steps, generator=[torch.Generator().manual_seed(seed)],
                          output_type="np").images
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(images)[0]).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    one(0)  # warm-up
    latencies, cpu_before, started = [], time.process_time(), time.perf_counter()
    for seed in range(args.pixels_requests):
        t0 = time.perf_counter()
        one(seed)
        latencies.append(time.perf_counter() - t0)
    images = args.pixels_requests
    return {"name": "raw pipeline + PNG, 1 process", "clients": 1, "images": images,
            "images_per_s": images / (time.perf_counter() - started), "p50_ms": 1000 * statistics.median(latencies),
            "process_cpu_ms_per_image": 1000 * (time.process_time() - cpu_before) / images}


def bench_pixels(args, logs: Path, failed: list[str]) -> list[dict]:
    rows = [] if args.skip_imagegen else attempt(failed, "imagegen", functools.partial(bench_pixels_server, args, logs))
    if not args.skip_baseline:
        rows += attempt(failed, "baseline", lambda: [bench_pixels_baseline(args)])
    return rows


def print_pixels(rows: list[dict]) -> None:
    print(f"{'':40} {'images':>6} {'images/s':>9} {'p50 ms':>9} {'server CPU ms/img':>18} {'less idle':>10} "
          f"{'workers CPU ms/img':>19}")
    for r in rows:
        if "process_cpu_ms_per_image" in r:
            print(f"{r['name']:40} {r['images']:6d} {r['images_per_s']:9.3f} {r['p50_ms']:9.0f}   "
                  f"(one process: {r['process_cpu_ms_per_image']:.0f} ms CPU per image)")
            continue
        print(f"{r['name']:40} {r['images']:6d} {r['images_per_s']:9.3f} {r['p50_ms']:9.0f} "
              f"{r['server_cpu_ms_per_image']:18.1f} {r['server_cpu_ms_per_image_less_idle']:10.1f} "
              f"{r['workers_cpu_ms_per_image']:19.0f}")
    idle = [r["server_idle_cpu_ms_per_s"] for r in rows if "server_idle_cpu_ms_per_s" in r]
    if idle:
        print(f"server idle CPU: {idle[0]:.2f} ms per s")


def bench_single(args, logs: Path, failed: list[str]) -> list[dict]:
    """The single workload: raw pipeline, naive server, then imagegen on each backend."""
    results = bench_raw(args)
    if not args.skip_naive:
        port = free_port()
        results += bench_server("naive server", peer_command("naive_server.py", port, args), port, args, logs)
    for backend in args.backends:
        results += attempt(failed, f"imagegen {backend}", functools.partial(bench_imagegen, backend, args, logs))
    add_ratios(results)
    return results


def print_single(results: list[dict]) -> None:
    print(f"{'':36} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x raw b8':>9} {'p50-raw b1':>11} {'x mp':>6}")
    for r in results:
        x_mp = f"{r['x_mp']:6.2f}" if "x_mp" in r else ""
        print(f"{r['name']:36} {r['images_per_s']:9.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['x_raw_b8']:9.2f} {r['p50_minus_raw_b1_ms']:+11.1f} {x_mp}".rstrip())


def main() -> None:
    ray_available = importlib.util.find_spec("ray") is not None
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workload", choices=("single", "mixed", "uniform", "pixels", "models"), default="single",
                        help="single: one step count (--steps), raw pipeline, naive server and the backends; "
                        "mixed, uniform: request vs step scheduling vs LitServe, 16 clients; pixels: CPU per "
                        "image of the server and its workers; models: one server with two models vs two servers "
                        "(see above)")
    parser.add_argument("--models", type=lambda value: value.split(","), default=["demo", "tiny"],
                        help="models: the two models, comma-separated")
    parser.add_argument("--models-clients", type=int, default=4, help="models: clients per model")
    parser.add_argument("--rounds", type=int, default=3, help="models: interleaved rounds (medians reported)")
    parser.add_argument("--pixels-requests", type=int, default=4,
                        help="pixels: requests of the 1-client load (the 4-client load sends as many in all)")
    parser.add_argument("--pixels-clients", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4],
                        help="pixels: the client counts of the loads, one after another (default 1,4)")
    parser.add_argument("--idle-window-s", type=float, default=10, help="pixels: the server's idle CPU window")
    parser.add_argument("--skip-baseline", action="store_true", help="pixels: without the raw pipeline row")
    parser.add_argument("--skip-imagegen", action="store_true", help="pixels: the raw pipeline row only")
    parser.add_argument("--imagegen-root", type=Path, default=ROOT,
                        help="the checkout whose `imagegen serve` is measured (default: this one)")
    parser.add_argument("--workload-seed", type=int, default=0, help="the mixed workload's step counts")
    parser.add_argument("--steps", type=int, default=4, help="the single workload's num_inference_steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--raw-calls", type=int, default=40)
    parser.add_argument("--single-requests", type=int, default=40)
    parser.add_argument("--requests-per-client", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--num-gpus", type=int, default=1, help="imagegen workers")
    parser.add_argument("--backends", type=parse_backends,
                        default=list(BACKENDS) if ray_available else ["mp", "grpc"],
                        help="imagegen backends to measure, comma-separated (default: mp,ray,ray_external,grpc "
                        "when Ray is installed, else mp,grpc)")
    parser.add_argument("--cache-dir", default=os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or tempfile.mkdtemp())
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = args.cache_dir
    # For the Ray backends: a private loopback Ray needs no auth token, and reports nothing.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logs = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    load_before = os.getloadavg()[0]  # other work on the machine makes every number noisy: say so

    failed: list[str] = []
    if args.workload == "single":
        results = bench_single(args, logs, failed)
        print_table = functools.partial(print_single, results)
    elif args.workload == "models":
        from bench_models import bench_models, print_models

        results = bench_models(args, logs, start, stop, free_port)
        print_table = functools.partial(print_models, args, results)
    elif args.workload == "pixels":
        results = bench_pixels(args, logs, failed)
        print_table = functools.partial(print_pixels, results)
    else:
        rows = bench_workload(args, logs, failed)
        ratios = workload_ratios(rows)
        results = rows + ratios
        print_table = functools.partial(print_workload, args, rows, ratios)
    steps = f" steps={args.steps}" if args.workload in ("single", "pixels") else ""
    print(f"\nmodel={args.model} size={args.size}x{args.size}{steps} device={args.device} "
          f"cpus={os.cpu_count()} load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, logs {logs}")
    print_table()
    for line in failed:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
