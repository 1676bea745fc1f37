"""Serving benchmark: the raw diffusers pipeline vs a naive FastAPI server vs `imagegen serve`, in one run.

Every number is measured in this run on this machine and printed as ratios against the raw
pipeline, so results from different machines are never mixed. Loopback only; bounded counts.

    python bench/bench_serving.py                        # tiny model, 64x64, 4 steps, CPU
    python bench/bench_serving.py --size 512 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, images: int, elapsed: float, latencies: list[float]) -> dict:
    return {
        "name": name,
        "images_per_s": images / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


# -- raw pipeline ------------------------------------------------------------------------------
def bench_raw(args) -> list[dict]:
    import torch
    from diffusers import DiffusionPipeline

    from workers.models import resolve_model_path
    from workers.worker import resolve_device, resolve_dtype

    device = resolve_device(args.device, 0)
    dtype = resolve_dtype("auto", device)
    pipeline = DiffusionPipeline.from_pretrained(resolve_model_path(args.model, args.cache_dir), dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)

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
    del pipeline
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# -- HTTP servers --------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
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


def load(name: str, port: int, args, clients: int, requests_per_client: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i in range(requests_per_client):
                body = {"prompt": "a red fox", "size": f"{args.size}x{args.size}",
                        "num_inference_steps": args.steps, "seed": (index + 1) * 1000 + i}
                t0 = time.perf_counter()
                response = http.post(url, json=body)
                elapsed = time.perf_counter() - t0
                response.raise_for_status()
                with lock:
                    latencies.append(elapsed)

    client(-1)  # warm-up
    latencies.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return summary(f"{name}, {clients} client(s)", clients * requests_per_client, time.perf_counter() - started, latencies)


def bench_server(name: str, command: list[str], port: int, args, logs: Path) -> list[dict]:
    process = start(command, port, logs / f"{name.split()[0]}.log")
    try:
        return [
            load(name, port, args, 1, args.single_requests),
            load(name, port, args, 16, args.requests_per_client),
        ]
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--raw-calls", type=int, default=40)
    parser.add_argument("--single-requests", type=int, default=40)
    parser.add_argument("--requests-per-client", type=int, default=10)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--num-gpus", type=int, default=1, help="imagegen workers")
    parser.add_argument("--cache-dir", default=os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or tempfile.mkdtemp())
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = args.cache_dir
    logs = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))

    results = bench_raw(args)
    if not args.skip_naive:
        port = free_port()
        naive = [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--port", str(port),
                 "--model", args.model, "--device", args.device]
        results += bench_server("naive server", naive, port, args, logs)
    port = free_port()
    imagegen = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", args.model,
                "--device", args.device, "--max-batch-size", str(args.max_batch_size), "--num-gpus", str(args.num_gpus)]
    results += bench_server("imagegen mp", imagegen, port, args, logs)

    by_name = {r["name"]: r for r in results}
    raw1, raw8 = by_name["raw pipeline, batch 1"], by_name["raw pipeline, batch 8"]
    print(f"\nmodel={args.model} size={args.size}x{args.size} steps={args.steps} device={args.device}")
    print(f"{'':34} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x raw b8':>9} {'p50-raw b1':>11}")
    for r in results:
        print(f"{r['name']:34} {r['images_per_s']:9.2f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['images_per_s'] / raw8['images_per_s']:9.2f} {r['p50_ms'] - raw1['p50_ms']:+11.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
