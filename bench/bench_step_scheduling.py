"""Mixed workload, --scheduling request vs step, in one run (issue 17's measurement, without LitServe yet).

16 clients; each request has 4 steps with probability 0.8 and 40 otherwise (the same seeded sequence
for both modes). Prints p50 and p99 of the short and of the long requests and images/s for each
mode, and step's ratios against request. Loopback only; bounded counts. See docs/benchmarks.md.

    python bench/bench_step_scheduling.py                 # tiny model, 64x64, CPU
    python bench/bench_step_scheduling.py --size 256
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import free_port, percentile, start, stop  # noqa: E402

SHORT_STEPS, LONG_STEPS, SHORT_SHARE = 4, 40, 0.8


def workload(clients: int, requests_per_client: int, seed: int) -> list[list[int]]:
    """Each client's step counts, in order."""
    chooser = random.Random(seed)
    return [
        [SHORT_STEPS if chooser.random() < SHORT_SHARE else LONG_STEPS for _ in range(requests_per_client)]
        for _ in range(clients)
    ]


def run(port: int, size: int, plan: list[list[int]]) -> dict:
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    latencies: dict[int, list[float]] = {SHORT_STEPS: [], LONG_STEPS: []}
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=900) as http:
            for i, steps in enumerate(plan[index]):
                body = {"prompt": "a red fox", "size": f"{size}x{size}", "num_inference_steps": steps,
                        "seed": index * 1000 + i}
                started = time.perf_counter()
                http.post(url, json=body).raise_for_status()
                with lock:
                    latencies[steps].append(time.perf_counter() - started)

    with httpx.Client(timeout=900) as http:  # warm-up
        http.post(url, json={"prompt": "a red fox", "size": f"{size}x{size}", "num_inference_steps": 2})
    started = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(client, range(len(plan))))
    elapsed = time.perf_counter() - started
    row = {"images_per_s": sum(len(steps) for steps in plan) / elapsed}
    for steps, name in ((SHORT_STEPS, "short"), (LONG_STEPS, "long")):
        samples = latencies[steps] or [float("nan")]
        row[f"{name}_p50_ms"] = 1000 * statistics.median(samples)
        row[f"{name}_p99_ms"] = 1000 * percentile(samples, 99)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or tempfile.mkdtemp())
    args = parser.parse_args()
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = args.cache_dir
    logs = Path(tempfile.mkdtemp(prefix="imagegen-bench-"))
    plan = workload(args.clients, args.requests_per_client, args.seed)
    load_before = os.getloadavg()[0]
    rows = {}
    for scheduling in ("request", "step"):
        port = free_port()
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", args.model,
                   "--device", args.device, "--max-batch-size", str(args.max_batch_size),
                   "--scheduling", scheduling, "--max-queue-size", "1000"]
        process = start(command, port, logs / f"{scheduling}.log")
        try:
            rows[scheduling] = run(port, args.size, plan)
        finally:
            stop(process)
    print(f"\nmodel={args.model} size={args.size}x{args.size} clients={args.clients} "
          f"requests={sum(len(p) for p in plan)} ({sum(s == LONG_STEPS for p in plan for s in p)} long) "
          f"cpus={os.cpu_count()} load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, logs {logs}")
    columns = ["images_per_s", "short_p50_ms", "short_p99_ms", "long_p50_ms", "long_p99_ms"]
    print(f"{'':16}" + "".join(f"{column:>14}" for column in columns))
    for name, row in rows.items():
        print(f"{name:16}" + "".join(f"{row[column]:14.1f}" for column in columns))
    ratios = {column: rows["step"][column] / rows["request"][column] for column in columns}
    print(f"{'step / request':16}" + "".join(f"{ratios[column]:14.2f}" for column in columns))


if __name__ == "__main__":
    main()
