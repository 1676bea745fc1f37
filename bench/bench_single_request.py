"""One request alone (issue 27): where `imagegen serve`'s p50 goes beyond the raw pipeline's batch-1 p50.

Each round runs the raw pipeline at batch 1 in this process (bench_serving.bench_raw), then `imagegen serve`
(backend mp), sending one request at a time, and splits every request's latency by what the server reports for it:
its request log line (the app's time, the queue time and the engine step's time) and the worker's stage timers
(the `imagegen_request_stage_time_seconds` sums before and after it). Parts, medians over the requests:

- outside the app: the client, loopback TCP and uvicorn (the latency less the app's time);
- app, around the engine: routing, validation, prepare (in a thread) and the JSON answer;
- queue: from the request's arrival at the engine to its step's start (the batch timeout when idle);
- hops: the engine step less the worker's stages: the thread and pipe hops from the engine to the worker's pipeline
  thread and back, the pickles, the worker's own work around the pipeline call;
- pipeline call: text_encode + denoise + vae_decode in the worker, and its image_encode;
- and the pipeline call less the raw pipeline's p50 (hooks, generators: what the worker adds inside the call).

Every round measures its own raw baseline; the report is the median over rounds. ``--imagegen-root`` runs the
server of another checkout (e.g. main) with this bench, for before/after.

    python bench/bench_single_request.py --rounds 3 --requests 40
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import ROOT, bench_raw, free_port, imagegen_command, start, stop  # noqa: E402

STAGES = ("text_encode", "denoise", "vae_decode", "image_encode")
_STAGE_SUM = re.compile(r'imagegen_request_stage_time_seconds_sum\{[^}]*stage="(\w+)"[^}]*\} (\S+)')


def stage_sums(http: httpx.Client, base_url: str) -> dict[str, float]:
    sums = dict.fromkeys(STAGES, 0.0)
    for stage, value in _STAGE_SUM.findall(http.get(f"{base_url}/metrics").text):
        if stage in sums:
            sums[stage] += float(value)
    return sums


def log_fields(log: Path, request_id: str, deadline_s: float = 5.0) -> dict[str, float]:
    """duration_s, queue_time_s and inference_time_s of the request log line of ``request_id`` (polled: the line
    is written as the response leaves)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if f"request_id={request_id}" in line:
                return {key: float(value) for key, value in re.findall(r"(\w+_s)=([\d.]+)", line)}
        time.sleep(0.01)  # polling a file with a bounded deadline
    raise RuntimeError(f"no request log line for {request_id}")


def imagegen_parts(args, log: Path) -> list[dict[str, float]]:
    """Each request's parts in ms, one request at a time."""
    port = free_port()
    process = start(imagegen_command("mp", port, args), port, log, cwd=args.imagegen_root)
    base_url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a red fox", "size": f"{args.size}x{args.size}", "num_inference_steps": args.steps}
    rows = []
    try:
        with httpx.Client(timeout=300) as http:
            for i in range(args.requests + 2):  # the first two warm up
                before = stage_sums(http, base_url)
                request_id = uuid.uuid4().hex
                t0 = time.perf_counter()
                http.post(f"{base_url}/v1/images/generations", json={**body, "seed": i},
                          headers={"x-request-id": request_id}).raise_for_status()
                latency = time.perf_counter() - t0
                after = stage_sums(http, base_url)
                if i < 2:
                    continue
                fields = log_fields(log, request_id)
                stages = {stage: after[stage] - before[stage] for stage in STAGES}
                pipeline = stages["text_encode"] + stages["denoise"] + stages["vae_decode"]
                rows.append({key: 1000 * value for key, value in {
                    "latency": latency,
                    "outside the app": latency - fields["duration_s"],
                    "app, around the engine": fields["duration_s"] - fields["queue_time_s"]
                    - fields["inference_time_s"],
                    "queue": fields["queue_time_s"],
                    "hops": fields["inference_time_s"] - pipeline - stages["image_encode"],
                    "image_encode": stages["image_encode"],
                    "pipeline call": pipeline,
                }.items()})
    finally:
        stop(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="imagegen requests per round (after 2 warm-ups)")
    parser.add_argument("--raw-calls", type=int, default=40)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--imagegen-root", type=Path, default=ROOT,
                        help="the checkout whose `imagegen serve` is measured (default: this one)")
    parser.add_argument("--cache-dir", default=os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or tempfile.mkdtemp())
    args = parser.parse_args()
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = args.cache_dir
    logs = Path(tempfile.mkdtemp(prefix="imagegen-bench-single-"))
    print(f"model={args.model} size={args.size}x{args.size} steps={args.steps} cpus={os.cpu_count()} "
          f"server {args.imagegen_root} logs {logs}")
    rounds = []
    for round_index in range(args.rounds):
        load_before = os.getloadavg()[0]
        raw_p50 = next(r["p50_ms"] for r in bench_raw(args) if r["name"] == "raw pipeline, batch 1")
        rows = imagegen_parts(args, logs / f"imagegen-{round_index}.log")
        parts = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        parts["raw pipeline b1"] = raw_p50
        parts["latency - raw"] = parts["latency"] - raw_p50
        parts["pipeline call - raw"] = parts["pipeline call"] - raw_p50
        rounds.append(parts)
        print(f"round {round_index + 1} (load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after): "
              + ", ".join(f"{key} {value:.1f}" for key, value in parts.items()))
    print(f"\nmedian of {len(rounds)} rounds, ms (each part the median over the round's requests):")
    for key in rounds[0]:
        print(f"  {key:28} {statistics.median(r[key] for r in rounds):8.1f}")


if __name__ == "__main__":
    main()
