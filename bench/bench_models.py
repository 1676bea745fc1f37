"""--workload models of bench/bench_serving.py (issue 24): two models behind one `imagegen serve` against the
same two models in two single-model servers running at the same time, and what a request that must load its
model first costs. See docs/benchmarks.md, "Several models".

Each round, interleaved (--rounds, medians reported):
- loads: in the one server, each model is unloaded (admin route) and then asked for; the request's latency
  (first_request_s) against the load time the server measured (imagegen_model_load_seconds) plus a warm
  request's latency (warm_request_s). Goal: first_request_s <= 1.1 x (load_s + warm_request_s).
- throughput: 8 clients, 4 per model (--models-clients), against the one server with both models loaded, then
  4 clients against each of the two servers at once. Goal: one server's images/s >= 0.9 x the two servers'.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ADMIN_KEY = "bench-admin-key"


def _body(args, model: str, seed: int) -> dict:
    return {"prompt": "a red fox", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps,
            "seed": seed, "model": model}


def _generate(http: httpx.Client, port: int, body: dict) -> float:
    """Seconds one request took (raises on an error status)."""
    started = time.perf_counter()
    http.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body).raise_for_status()
    return time.perf_counter() - started


def _load_seconds(port: int, model: str) -> tuple[float, float]:
    """(sum, count) of the server's imagegen_model_load_seconds for ``model``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    found = {"imagegen_model_load_seconds_sum": 0.0, "imagegen_model_load_seconds_count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found and sample.labels.get("model_name") == model:
                found[sample.name] = sample.value
    return found["imagegen_model_load_seconds_sum"], found["imagegen_model_load_seconds_count"]


def measure_load(args, port: int, model: str) -> dict:
    """Unload ``model``, then time a request that must load it, the load itself, and a warm request."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(timeout=900) as http:
        http.post(f"http://127.0.0.1:{port}/v1/models/{model}/unload", headers=admin).raise_for_status()
        total_before, count_before = _load_seconds(port, model)
        first = _generate(http, port, _body(args, model, 1))
        total, count = _load_seconds(port, model)
        assert count == count_before + 1, f"{model}: expected one load, the server counted {count - count_before}"
        warm = statistics.median(_generate(http, port, _body(args, model, 2 + i)) for i in range(3))
    load = total - total_before
    return {"model": model, "first_request_s": first, "load_s": load, "warm_request_s": warm,
            "first_over_load_plus_warm": first / (load + warm)}


def throughput(args, targets: list[tuple[int, str]]) -> float:
    """Images/s of ``args.models_clients`` clients per (port, model) target, all at once, each sending
    ``args.requests_per_client`` requests one after another (after one warm-up request each)."""
    clients = [target for target in targets for _ in range(args.models_clients)]
    barrier = threading.Barrier(len(clients) + 1)

    def client(index: int) -> None:
        port, model = clients[index]
        with httpx.Client(timeout=900) as http:
            _generate(http, port, _body(args, model, 10_000 + index))  # warm-up
            barrier.wait()
            for i in range(args.requests_per_client):
                _generate(http, port, _body(args, model, index * 1000 + i))

    with ThreadPoolExecutor(len(clients)) as pool:
        done = [pool.submit(client, index) for index in range(len(clients))]
        barrier.wait()
        started = time.perf_counter()
        for future in done:
            future.result()
    return len(clients) * args.requests_per_client / (time.perf_counter() - started)


def bench_models(args, logs: Path, start: Callable, stop: Callable, free_port: Callable[[], int]) -> list[dict]:
    import os
    import sys

    first, second = args.models
    os.environ["IMAGEGEN_ADMIN_API_KEY"] = ADMIN_KEY  # the admin routes unload the models between rounds

    def serve(*models: str) -> tuple:
        port = free_port()
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", *models,
                   "--device", args.device, "--max-batch-size", str(args.max_batch_size)]
        return start(command, port, logs / f"serve-{'-'.join(models)}.log"), port

    processes = []
    try:
        one, one_port = serve(first, second)
        processes.append(one)
        apart = [serve(first), serve(second)]
        processes += [process for process, _ in apart]
        rounds = []
        for round_index in range(args.rounds):
            loads = [measure_load(args, one_port, model) for model in (first, second)]
            one_server = throughput(args, [(one_port, first), (one_port, second)])
            two_servers = throughput(args, [(apart[0][1], first), (apart[1][1], second)])
            rounds.append({"round": round_index, "loads": loads, "one_server_images_per_s": one_server,
                           "two_servers_images_per_s": two_servers, "one_over_two": one_server / two_servers})
            print(f"round {round_index}: one server {one_server:.2f} images/s, two servers {two_servers:.2f}, "
                  f"ratio {one_server / two_servers:.3f}; " + "; ".join(
                      f"{load['model']} first {load['first_request_s']:.2f}s = load {load['load_s']:.2f}s + "
                      f"warm {load['warm_request_s']:.3f}s x {load['first_over_load_plus_warm']:.3f}"
                      for load in loads), flush=True)
        return rounds
    finally:
        for process in processes:
            stop(process)


def print_models(args, rounds: list[dict]) -> None:
    def median(values) -> float:
        return statistics.median(list(values))

    first, second = args.models
    print(f"models={first},{second} clients={args.models_clients} per model, requests_per_client="
          f"{args.requests_per_client}, rounds={len(rounds)} (medians)")
    print(f"{'':40} {'images/s':>9}")
    print(f"{'one server, both models':40} {median(r['one_server_images_per_s'] for r in rounds):9.2f}")
    print(f"{'two servers, one model each':40} {median(r['two_servers_images_per_s'] for r in rounds):9.2f}")
    print(f"{'one / two (goal >= 0.9)':40} {median(r['one_over_two'] for r in rounds):9.3f}")
    print(f"\n{'model':12} {'load_s':>8} {'warm_s':>8} {'first_s':>8} {'first/(load+warm) (goal <= 1.1)':>32}")
    for index, model in enumerate((first, second)):
        loads = [r["loads"][index] for r in rounds]
        print(f"{model:12} {median(x['load_s'] for x in loads):8.2f} {median(x['warm_request_s'] for x in loads):8.3f}"
              f" {median(x['first_request_s'] for x in loads):8.2f}"
              f" {median(x['first_over_load_plus_warm'] for x in loads):32.3f}")
