"""Overload soak: many requests from many clients against a server with a small queue.

Checks that every answer is a 200 or a 429 (never a 5xx or a dropped connection) and that the
server's memory after the run stays within a bound of its memory after warm-up. Loopback only,
bounded in requests and time; it starts and stops its own server.

    python bench/load_test.py                       # 2,000 requests, 64 clients, queue of 32
    python bench/load_test.py --requests 300 --concurrency 32 --queue 8   # what CI runs
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import free_port, start, stop  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def run_load(url: str, total: int, concurrency: int, deadline_s: float) -> collections.Counter:
    """``total`` requests from ``concurrency`` clients; counts status codes (or exception names)."""
    outcomes: collections.Counter = collections.Counter()
    remaining = iter(range(total))
    stop_at = time.monotonic() + deadline_s

    async def client(http: httpx.AsyncClient) -> None:
        for seed in remaining:
            if time.monotonic() > stop_at:
                outcomes["not sent (time limit)"] += 1
                continue
            body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 4, "seed": seed}
            try:
                outcomes[(await http.post(url, json=body)).status_code] += 1
            except httpx.HTTPError as error:
                outcomes[type(error).__name__] += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--queue", type=int, default=32, help="the server's --max-queue-size")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--time-limit-s", type=float, default=600)
    parser.add_argument("--max-rss-growth-mb", type=float, default=150)
    args = parser.parse_args()

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="imagegen-load-")) / "server.log"
    # Every client here is one key (one address): its share of the queue is the whole queue, so the soak fills it.
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", args.model,
               "--max-queue-size", str(args.queue), "--max-queued-images-per-key", str(args.queue)]
    server = start(command, port, log)
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    try:
        warm_up = asyncio.run(run_load(url, 2 * args.queue, min(args.concurrency, args.queue), args.time_limit_s))
        rss_warm = rss_bytes(server.pid)
        started = time.monotonic()
        outcomes = asyncio.run(run_load(url, args.requests, args.concurrency, args.time_limit_s))
        elapsed = time.monotonic() - started
        rss_after = rss_bytes(server.pid)
    finally:
        stop(server)
    growth_mb = (rss_after - rss_warm) / 2**20
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "queue": args.queue,
        "seconds": round(elapsed, 1),
        "warm_up": {str(k): v for k, v in warm_up.items()},
        "outcomes": {str(k): v for k, v in outcomes.items()},
        "rss_after_warm_up_mb": round(rss_warm / 2**20, 1),
        "rss_after_run_mb": round(rss_after / 2**20, 1),
        "rss_growth_mb": round(growth_mb, 1),
    }
    print(json.dumps(report, indent=2))
    unexpected = set(outcomes) - {200, 429}
    if unexpected or growth_mb > args.max_rss_growth_mb:
        print(f"FAILED: unexpected outcomes {sorted(map(str, unexpected))} or RSS growth {growth_mb:.1f} MB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
