"""Chaos run (issue 28): faults under a mixed load, and what every request got.

    python bench/chaos.py --backend mp   --rounds 2
    python bench/chaos.py --backend grpc --rounds 2

It starts the server itself on loopback: the tiny model, two ranks, each its own rank group (grpc: two
`imagegen worker` processes it starts), API keys and the LoRA adapter "sharp". Client threads send
mixed requests (sizes, n, steps, some naming the adapter, some streamed) with several API keys and a
client deadline. Meanwhile it runs a fixed order of faults on rank 1, --rounds times:

- kill: SIGKILL the worker. mp: the server restarts it. grpc: once the server has noticed, the worker
  is started again on its port;
- stall: SIGSTOP the worker for --stall-s, then SIGCONT;
- lora: unload the adapter and load it again through the admin routes.

Each fault starts once the server serves with both groups again and has answered --gap-requests
more requests. Everything waits by polling (/ready, /metrics' imagegen_rank_groups, the worker's gRPC
health), never by sleeping a guessed time. mp also measures the idle restart first: rank 1 killed
with no load, the time until both groups serve again (and a request is served).

What it counts: every request sent gets a status or reaches its client deadline (hung; a dropped
connection is lost); a 5xx (or a stream's error event) is expected only for a request that overlapped
a fault window on rank 1 and names that rank; recovery: from the kill (mp), from the restarted
worker's SERVING (grpc) or from the SIGCONT until both groups serve and /ready is 200; the share of
requests served. Goals: nothing lost or hung; >= 90% served; 5xx only from the faulted rank; recovery
<= 1.5x the idle restart (mp) or <= 3 probe intervals (grpc). It prints a table and PASS/FAIL per
goal, and exits 1 when a goal fails. Kept out of the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' process helpers and LoRA adapters, as bench_lora.py does

from helpers import ServerProcess, WorkerProcess, metric_samples, worker_pids_of  # noqa: E402
from lora_adapters import make_lora  # noqa: E402

from workers.config import default_cache_dir  # noqa: E402

API_KEYS = ["chaos-key-a", "chaos-key-b", "chaos-key-c"]
ADMIN_KEY = "chaos-admin-key"
ADAPTER = "sharp"
GROUPS = 2
FAULTED_RANK = 1
# How often the waits look again.
POLL_S = 0.1


@dataclass
class Answer:
    """One request: who sent it, when, and what it got (an HTTP status, "stream-error", "hung" or "lost")."""

    key: str
    started: float
    ended: float
    outcome: str
    message: str = ""
    named_adapter: bool = False

    @property
    def served(self) -> bool:
        return self.outcome == "200"

    @property
    def server_error(self) -> bool:
        return self.outcome.startswith("5") or self.outcome == "stream-error"


@dataclass
class Fault:
    """One fault: its window (from the fault until the server serves with both groups again) and recovery."""

    round: int
    kind: str
    started: float
    ended: float = 0.0
    recovery_s: float | None = None  # None: the fault is not one the recovery goal covers (lora)
    noticed: bool = False  # the server took the rank out of service (its groups metric showed it)
    note: str = ""

    def overlaps(self, answer: Answer) -> bool:
        return answer.started < self.ended and answer.ended > self.started


def wait_until(condition: Callable[[], bool], bound_s: float, what: str) -> float:
    """Poll ``condition`` until it holds; the seconds it took. RuntimeError past ``bound_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > bound_s:
            raise RuntimeError(f"timed out after {bound_s:g}s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic() - started


class Observer:
    """What the server says about itself: its rank groups' states and /ready."""

    def __init__(self, base_url: str):
        self.base_url = base_url

    def group_states(self) -> Counter:
        """imagegen_rank_groups by state (serving, set_aside, restarting); empty when /metrics does not answer."""
        try:
            text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return Counter()
        states: Counter = Counter()
        for sample in metric_samples(text, "imagegen_rank_groups"):
            states[sample.labels["state"]] += int(sample.value)
        return states

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def serving_all(self) -> bool:
        return self.group_states()["serving"] == GROUPS and self.ready()

    def rank_out(self) -> bool:
        return self.group_states()["serving"] < GROUPS


class Load:
    """Client threads that send mixed requests until stopped; every request's answer is recorded."""

    def __init__(self, base_url: str, clients: int, deadline_s: float):
        self.url = f"{base_url}/v1/images/generations"
        self.deadline_s = deadline_s
        self.answers: list[Answer] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(index,), daemon=True) for index in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> bool:
        """Stop sending and wait for the requests in flight (each ends by its deadline); False if one never did."""
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(self.deadline_s + 30)
        return not any(thread.is_alive() for thread in self._threads)

    def served_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for answer in self.answers if answer.served and answer.started >= moment)

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        key = API_KEYS[index % len(API_KEYS)]
        # The deadline bounds the whole request: connecting, waiting for the answer, reading it.
        timeout = httpx.Timeout(self.deadline_s)
        with httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"}) as client:
            while not self._stop.is_set():
                body = {
                    "prompt": rng.choice(["a red fox", "two blue squares", "a small yellow triangle"]),
                    "size": rng.choice(["64x64", "64x64", "128x128"]),
                    "n": rng.choice([1, 1, 2, 3]),
                    "num_inference_steps": rng.choice([2, 4]),
                    "stream": rng.random() < 0.15,
                }
                if rng.random() < 0.25:
                    body["loras"] = [{"name": ADAPTER}]
                with self._lock:
                    self.sent += 1
                self._record(key, body, client)

    def _record(self, key: str, body: dict, client: httpx.Client) -> None:
        started = time.monotonic()
        message = ""
        try:
            with client.stream("POST", self.url, json=body) as response:
                text = response.read().decode(errors="replace")
            outcome = str(response.status_code)
            if response.status_code != 200:
                message = text[:300]
            elif body["stream"] and "event: error" in text:
                outcome, message = "stream-error", text[text.index("event: error") :][:300]
        except httpx.TimeoutException:
            outcome = "hung"
        except httpx.HTTPError as error:
            outcome, message = "lost", repr(error)
        if time.monotonic() - started > self.deadline_s:  # httpx's timeouts bound each read, not the whole request
            outcome = "hung"
        answer = Answer(key, started, time.monotonic(), outcome, message, named_adapter="loras" in body)
        with self._lock:
            self.answers.append(answer)


class Cluster:
    """The server and, for grpc, its two `imagegen worker` processes; rank 1 is the one faulted."""

    def __init__(self, args: argparse.Namespace, adapter: Path):
        self.args = args
        self.worker_flags = ("--model", "tiny", "--num-gpus", str(GROUPS), "--rpc-timeout-s", str(args.rpc_timeout_s))
        self.workers: dict[int, WorkerProcess] = {}
        backend: tuple[str, ...] = ()
        if args.backend == "grpc":
            self.workers = {rank: WorkerProcess(rank, *self.worker_flags, wait=False) for rank in range(GROUPS)}
            for worker in self.workers.values():
                worker.wait_serving()
            addresses = ",".join(self.workers[rank].address for rank in range(GROUPS))
            backend = ("--backend", "grpc", "--worker-addresses", addresses)
        self.server = ServerProcess(
            *self.worker_flags, *backend, "--health-check-interval-s", str(args.health_check_interval_s),
            "--allow-runtime-lora", "--lora-modules", f"{ADAPTER}={adapter}", "--max-queue-size", "1024",
            env={"IMAGEGEN_API_KEY": ",".join(API_KEYS), "IMAGEGEN_ADMIN_API_KEY": ADMIN_KEY},
            ready_timeout_s=300,
        )
        self.observer = Observer(self.server.base_url)
        self.adapter = adapter

    def faulted_pid(self) -> int:
        if self.args.backend == "grpc":
            return self.workers[FAULTED_RANK].process.pid
        for pid in worker_pids_of(self.server.process.pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[argv.index(b"--rank") + 1] == str(FAULTED_RANK).encode():
                return pid
        raise RuntimeError(f"no mp worker of rank {FAULTED_RANK}")

    def restarted_mp_worker(self, old_pid: int) -> bool:
        try:
            return self.faulted_pid() != old_pid
        except (RuntimeError, OSError, ValueError):
            return False

    def stop(self) -> None:
        self.server.stop()
        for worker in self.workers.values():
            worker.stop()

    # -- faults; each returns with the server serving on both groups again --------------------------
    def kill(self, fault: Fault) -> None:
        bound_s = self.args.recovery_bound_s
        pid = self.faulted_pid()
        os.kill(pid, signal.SIGKILL)
        if self.args.backend == "mp":  # the server restarts it
            wait_until(lambda: self.restarted_mp_worker(pid), bound_s, "the mp worker to be started again")
            wait_until(self.observer.serving_all, bound_s, "both groups to serve")
            fault.noticed = True
            fault.ended = time.monotonic()
            fault.recovery_s = fault.ended - fault.started
            return
        self.workers[FAULTED_RANK].process.wait()
        wait_until(self.observer.rank_out, bound_s, "the server to notice the killed worker")
        fault.noticed = True
        killed = self.workers[FAULTED_RANK]
        restarted = WorkerProcess(FAULTED_RANK, *self.worker_flags, port=killed.port, wait=False)
        killed.log.close()
        self.workers[FAULTED_RANK] = restarted
        restarted.wait_serving(bound_s)
        up = time.monotonic()
        fault.note = f"worker up again {up - fault.started:.1f}s after the kill"
        wait_until(self.observer.serving_all, bound_s, "the restarted worker to be re-admitted")
        fault.ended = time.monotonic()
        fault.recovery_s = fault.ended - up

    def stall(self, fault: Fault) -> None:
        pid = self.faulted_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            # The stall lasts --stall-s; meanwhile, look whether the server takes the rank out.
            while time.monotonic() - fault.started < self.args.stall_s:
                fault.noticed = fault.noticed or self.observer.rank_out()
                time.sleep(POLL_S)
        finally:
            os.kill(pid, signal.SIGCONT)
        continued = time.monotonic()
        wait_until(self.observer.serving_all, self.args.recovery_bound_s, "both groups to serve after SIGCONT")
        fault.ended = time.monotonic()
        fault.recovery_s = fault.ended - continued

    def reload_adapter(self, fault: Fault) -> None:
        def admin(route: str, **body) -> httpx.Response:
            return httpx.post(f"{self.server.base_url}/v1/{route}", json=body, timeout=self.args.recovery_bound_s,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"})

        unloaded = admin("unload_lora_adapter", lora_name=ADAPTER)
        loaded = admin("load_lora_adapter", lora_name=ADAPTER, lora_path=str(self.adapter))
        fault.ended = time.monotonic()
        fault.note = f"unload {unloaded.status_code}, load {loaded.status_code}"
        if (unloaded.status_code, loaded.status_code) != (200, 200):
            raise RuntimeError(f"the adapter reload failed: {unloaded.text[:200]} {loaded.text[:200]}")


def idle_restart_s(cluster: Cluster) -> tuple[float, float]:
    """mp, no load: seconds from killing rank 1 until both groups serve, and until a request is served."""
    pid = cluster.faulted_pid()
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    bound_s = cluster.args.recovery_bound_s
    wait_until(lambda: cluster.restarted_mp_worker(pid), bound_s, "the mp worker to be started again")
    wait_until(cluster.observer.serving_all, bound_s, "both groups to serve")
    serving_s = time.monotonic() - killed
    answer = httpx.post(
        f"{cluster.server.base_url}/v1/images/generations", json={"prompt": "a red fox", "size": "64x64", "n": 2},
        headers={"Authorization": f"Bearer {API_KEYS[0]}"}, timeout=bound_s,
    )
    if answer.status_code != 200:
        raise RuntimeError(f"no request served after the idle restart: {answer.status_code} {answer.text[:200]}")
    return serving_s, time.monotonic() - killed


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def report(args, faults: list[Fault], load: Load, all_ended: bool, idle: tuple[float, float] | None) -> bool:
    """Print the table and the goals; True when every goal passes."""
    answers = load.answers
    outcomes = Counter(answer.outcome for answer in answers)
    print(f"\n{'round':>5} {'fault':<7} {'at s':>7} {'window s':>9} {'noticed':>8} {'recovery s':>11} "
          f"{'requests':>9} {'5xx':>4}  note")
    first = faults[0].started if faults else 0.0
    for fault in faults:
        overlapping = [answer for answer in answers if fault.overlaps(answer)]
        recovery = "-" if fault.recovery_s is None else f"{fault.recovery_s:.1f}"
        print(f"{fault.round:>5} {fault.kind:<7} {fault.started - first:>7.1f} {fault.ended - fault.started:>9.1f} "
              f"{'yes' if fault.noticed else 'no':>8} {recovery:>11} {len(overlapping):>9} "
              f"{sum(answer.server_error for answer in overlapping):>4}  {fault.note}")

    rank_name = f"rank {FAULTED_RANK}"
    rank_faults = [fault for fault in faults if fault.kind != "lora"]
    unexplained = [
        answer for answer in answers if answer.server_error
        and not (rank_name in answer.message and any(fault.overlaps(answer) for fault in rank_faults))
    ]
    adapter_refusals = [
        answer for answer in answers if answer.outcome == "404" and answer.named_adapter
        and any(fault.overlaps(answer) for fault in faults if fault.kind == "lora")
    ]
    served = sum(answer.served for answer in answers)
    print(f"\nrequests sent {load.sent}, answered or timed out {len(answers)}: {dict(sorted(outcomes.items()))}")
    print(f"served {served} ({served / max(1, len(answers)):.1%}); 404 for the adapter while it reloaded: "
          f"{len(adapter_refusals)}; 5xx naming {rank_name} in its fault window: "
          f"{sum(answer.server_error for answer in answers) - len(unexplained)}")
    for key in API_KEYS:
        mine = [answer for answer in answers if answer.key == key]
        print(f"  {key}: {len(mine)} requests, {sum(answer.served for answer in mine)} served")
    for message in sorted({answer.message[:200] for answer in unexplained}):
        print(f"  5xx outside a fault window of {rank_name}, or not naming it: {message}")
    other = [answer for answer in answers if answer.outcome not in ("200", "hung", "lost") and not answer.server_error
             and answer not in adapter_refusals]
    for message in sorted({f"{answer.outcome} {answer.message[:160]}" for answer in other}):
        print(f"  other answer: {message}")

    lost = outcomes["lost"] + load.sent - len(answers)
    goals = {
        "nothing lost or hung": all_ended and lost == 0 and outcomes["hung"] == 0,
        ">= 90% served": served >= 0.9 * len(answers),
        f"5xx only from {rank_name} in its fault windows": not unexplained,
    }
    recoveries = [fault.recovery_s for fault in rank_faults if fault.recovery_s is not None]
    worst = max(recoveries, default=0.0)
    if idle is not None:
        print(f"idle restart: both groups serve {idle[0]:.1f}s after the kill, a request served at {idle[1]:.1f}s")
        goals[f"recovery {worst:.1f}s <= 1.5x idle restart ({1.5 * idle[0]:.1f}s)"] = worst <= 1.5 * idle[0]
    else:
        bound = 3 * args.health_check_interval_s
        goals[f"recovery {worst:.1f}s <= 3 probe intervals ({bound:g}s)"] = worst <= bound
    print()
    for goal, passed in goals.items():
        print(f"{'PASS' if passed else 'FAIL'}  {goal}")
    return all(goals.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["mp", "grpc"], default="mp")
    parser.add_argument("--rounds", type=int, default=2, help="times the fault order (kill, stall, lora) runs")
    parser.add_argument("--clients", type=int, default=6, help="client threads, taking the API keys in turn")
    parser.add_argument("--client-deadline-s", type=float, default=120, help="a request unanswered by then is hung")
    parser.add_argument("--health-check-interval-s", type=float, default=5.0)
    # A busy 2-core machine needs room: a rank 0 busy with 128x128 n=3 must not be taken for hung.
    parser.add_argument("--rpc-timeout-s", type=float, default=30.0)
    parser.add_argument("--stall-s", type=float, default=6.0)
    parser.add_argument("--gap-requests", type=int, default=8, help="requests served between two faults")
    parser.add_argument("--recovery-bound-s", type=float, default=300, help="a wait longer than this aborts the run")
    args = parser.parse_args()

    settings = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items())
    print(f"chaos run: {settings}\nCPU {cpu_model()} x {os.cpu_count()}, load average {load_average()}")
    folder = Path(tempfile.mkdtemp(prefix="imagegen-chaos-"))
    adapter = make_lora(folder / ADAPTER, default_cache_dir(), seed=1)
    cluster = Cluster(args, adapter)
    faults: list[Fault] = []
    idle = None
    load = Load(cluster.server.base_url, args.clients, args.client_deadline_s)
    try:
        wait_until(cluster.observer.serving_all, args.recovery_bound_s, "both groups to serve")
        if args.backend == "mp":
            idle = idle_restart_s(cluster)
            print(f"idle restart: {idle[0]:.1f}s to serve on both groups, {idle[1]:.1f}s to a served request")
        load.start()
        actions = {"kill": cluster.kill, "stall": cluster.stall, "lora": cluster.reload_adapter}
        for round_ in range(1, args.rounds + 1):
            for kind, action in actions.items():
                steady = time.monotonic()
                wait_until(cluster.observer.serving_all, args.recovery_bound_s, "both groups to serve")
                wait_until(lambda since=steady: load.served_since(since) >= args.gap_requests,
                           args.recovery_bound_s, f"{args.gap_requests} requests served")
                fault = Fault(round_, kind, started=time.monotonic())
                faults.append(fault)
                action(fault)
                recovery = "" if fault.recovery_s is None else f", recovery {fault.recovery_s:.1f}s"
                print(f"round {round_} {kind}: window {fault.ended - fault.started:.1f}s{recovery} "
                      f"{fault.note} (load average {load_average()})", flush=True)
    finally:
        all_ended = load.stop()
        cluster.stop()
    print(f"load average at the end {load_average()}")
    return 0 if report(args, faults, load, all_ended, idle) else 1


if __name__ == "__main__":
    sys.exit(main())
