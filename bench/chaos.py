"""Chaos run (issue 28): drive `imagegen serve` with mixed requests while faults are injected.

DRAFT: the figures in docs/reliability.md are still to come.

    python bench/chaos.py --backend mp   --duration-s 150
    python bench/chaos.py --backend grpc --duration-s 150

Loopback only. It starts the server (tiny model, CPU, two rank groups) itself; on a schedule it
SIGKILLs a worker (grpc: and starts it again on its port), SIGSTOPs one for --stall-s then SIGCONTs
it, and unloads and reloads a LoRA adapter. Exit status 1 when a goal fails.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # as bench_lora.py does, for make_lora

from bench_serving import free_port  # noqa: E402

API_KEYS = ["chaos-key-a", "chaos-key-b", "chaos-key-c"]
ADMIN_KEY = "chaos-admin-key"


def serving_groups(base_url: str) -> int:
    """imagegen_rank_groups{state="serving"}, or -1 when /metrics does not answer."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return -1
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("imagegen_rank_groups{") and 'state="serving"' in line)


def wait_recovered(base_url: str, since: float, bound_s: float = 300) -> float:
    """Seconds from ``since`` until both groups serve and /ready is 200 (bounded)."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if serving_groups(base_url) == 2 and httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
            return time.monotonic() - since
        time.sleep(0.1)
    return float("inf")


class Load:
    """Client threads sending mixed requests; every outcome is recorded with its times."""

    def __init__(self, base_url: str, clients: int, timeout_s: float):
        self.base_url, self.timeout_s = base_url, timeout_s
        self.results: list[tuple[float, float, str, str]] = []  # (start, end, outcome, message)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=self.timeout_s, headers={"Authorization": f"Bearer {API_KEYS[index % 3]}"}) as client:
            while not self.stop.is_set():
                body = {"prompt": "a red fox", "size": rng.choice(["64x64", "128x128"]), "n": rng.randint(1, 2),
                        "num_inference_steps": 2, "stream": rng.random() < 0.2}
                started = time.monotonic()
                try:
                    response = client.post(f"{self.base_url}/v1/images/generations", json=body)
                    outcome, message = str(response.status_code), response.text[:300]
                    if body["stream"] and "event: error" in response.text:
                        outcome = "stream-error"
                except httpx.TimeoutException:
                    outcome, message = "hung", ""
                except httpx.HTTPError as error:
                    outcome, message = "lost", repr(error)
                self.results.append((started, time.monotonic(), outcome, message))


def worker_pids(server_pid: int) -> list[int]:
    """The server's mp worker processes, rank order (their --rank argument)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == server_pid:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"workers.hosts.process" in argv:
                    found.append((int(argv[argv.index(b"--rank") + 1]), int(entry.name)))
        except (OSError, ValueError):
            continue
    return [pid for _, pid in sorted(found)]


def start_process(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def wait_for(condition, bound_s: float, what: str) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["mp", "grpc"], default="mp")
    parser.add_argument("--duration-s", type=float, default=150)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--client-timeout-s", type=float, default=90)
    parser.add_argument("--probe-interval-s", type=float, default=2.0)
    parser.add_argument("--rpc-timeout-s", type=float, default=30.0)
    parser.add_argument("--stall-s", type=float, default=6.0)
    args = parser.parse_args()
    from lora_adapters import make_lora

    from workers.config import default_cache_dir

    folder = Path(tempfile.mkdtemp(prefix="imagegen-chaos-"))
    adapter = make_lora(folder / "sharp", default_cache_dir(), seed=1)
    py = [sys.executable, "-m", "server.cli"]
    common = ["--model", "tiny", "--num-gpus", "2", "--rpc-timeout-s", str(args.rpc_timeout_s)]
    workers: dict[int, subprocess.Popen] = {}
    ports = {rank: free_port() for rank in range(2)}
    if args.backend == "grpc":
        for rank in range(2):
            workers[rank] = start_process([*py, "worker", "--port", str(ports[rank]), "--rank", str(rank), *common], folder / f"w{rank}.log")
        extra = ["--backend", "grpc", "--worker-addresses", ",".join(f"127.0.0.1:{ports[r]}" for r in range(2))]
    else:
        extra = []
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_process([*py, "serve", "--port", str(port), *common, *extra, "--health-check-interval-s",
                            str(args.probe_interval_s), "--allow-runtime-lora", "--lora-modules", f"sharp={adapter}"],
                           folder / "server.log", env={"IMAGEGEN_API_KEY": ",".join(API_KEYS), "IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY})
    try:
        wait_for(lambda: serving_groups(base_url) == 2, 300, "the server")
        idle_restart_s = None
        if args.backend == "mp":
            killed_at = time.monotonic()
            os.kill(worker_pids(server.pid)[1], signal.SIGKILL)
            time.sleep(0.5)
            idle_restart_s = wait_recovered(base_url, killed_at)
            print(f"idle restart: {idle_restart_s:.1f}s")
        load = Load(base_url, args.clients, args.client_timeout_s)
        for thread in load.threads:
            thread.start()
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        faults = []  # (name, start, recovery_s)
        end = time.monotonic() + args.duration_s
        kinds = ["kill", "stall", "lora"]
        while time.monotonic() < end - 20:
            kind = kinds[len(faults) % 3]
            time.sleep(5)
            started = time.monotonic()
            if kind == "kill" and args.backend == "mp":
                os.kill(worker_pids(server.pid)[1], signal.SIGKILL)
                time.sleep(0.5)
                over = started
            elif kind == "kill":
                workers[1].kill()
                workers[1].wait()
                workers[1] = start_process([*py, "worker", "--port", str(ports[1]), "--rank", "1", *common], folder / "w1.log")
                over = time.monotonic()
            elif kind == "stall":
                pid = worker_pids(server.pid)[1] if args.backend == "mp" else workers[1].pid
                os.kill(pid, signal.SIGSTOP)
                time.sleep(args.stall_s)
                os.kill(pid, signal.SIGCONT)
                over = time.monotonic()
            else:
                httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "sharp"}, headers=admin, timeout=120)
                httpx.post(f"{base_url}/v1/load_lora_adapter", json={"lora_name": "sharp", "lora_path": str(adapter)}, headers=admin, timeout=120)
                over = time.monotonic()
            time.sleep(args.probe_interval_s)  # let the server notice before asking whether it is back
            faults.append((kind, started, wait_recovered(base_url, over)))
            print(f"{kind}: recovered {faults[-1][2]:.1f}s after the fault ended")
        load.stop.set()
        for thread in load.threads:
            thread.join(args.client_timeout_s + 10)
    finally:
        for process in [server, *workers.values()]:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    results = load.results
    counts: dict[str, int] = {}
    for _, _, outcome, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    served = sum(v for k, v in counts.items() if k.startswith("2") and k != "stream-error")
    fivexx = [m for _, _, o, m in results if o.startswith("5") or o == "stream-error"]
    print(f"requests {len(results)}: {counts}")
    print(f"5xx naming rank 1: {sum('rank 1' in m for m in fivexx)} of {len(fivexx)}")
    for message in sorted({m[:160] for m in fivexx if "rank 1" not in m}):
        print(f"  5xx not naming rank 1: {message}")
    goals = {
        "nothing lost or hung": counts.get("lost", 0) + counts.get("hung", 0) == 0,
        ">= 90% served": served >= 0.9 * len(results),
        "5xx only on the failed rank": all("rank 1" in m for m in fivexx),
    }
    worst = max((r for k, _, r in faults if k != "lora"), default=0)
    if idle_restart_s is not None:
        goals["recovery <= 1.5x idle restart"] = worst <= 1.5 * idle_restart_s
    else:
        goals["recovery <= 3 probe intervals"] = worst <= 3 * args.probe_interval_s
    for goal, ok in goals.items():
        print(f"{'PASS' if ok else 'FAIL'}  {goal}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
