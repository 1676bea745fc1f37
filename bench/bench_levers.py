"""Speed-lever benchmark: the raw diffusers pipeline vs `imagegen serve` plain, with each step cache,
with compile, and with compile + the best cache, measured in one run and printed as ratios to the raw
pipeline of that run, with each cached row's PSNR against the uncached (plain) output for the same
seeds. One client sends one image at a time (batch 1). Loopback only; bounded counts. See
docs/benchmarks.md ("Speed levers").

    python bench/bench_levers.py                                   # tiny-flux, 128x128, 20 steps, CPU
    python bench/bench_levers.py --model random-flux-dev --size 1024 --steps 28 --device cuda \\
        --rows raw,plain,compile+taylorseer
    python bench/bench_levers.py --quality-model demo              # also: PSNR of each cache on the demo model

Peak memory is the worker's (or the raw pipeline process's): peak resident set on CPU, the peak
that nvidia-smi reports for that process on CUDA. Adaptive caches (first-block) are also reported
with their skip rate, which on random weights means nothing.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_serving import free_port, percentile, start, stop  # noqa: E402 - after the path set-up

from workers.levers import ADAPTIVE_CACHE_METHODS as ADAPTIVE  # noqa: E402

PROMPT = "a red fox in the snow"


# -- memory ---------------------------------------------------------------------------------------
def peak_rss_bytes(pid: int | str) -> int:
    """The peak resident set (VmHWM) of a live process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


class PeakCudaMemory:
    """The largest GPU memory use nvidia-smi reports for one process, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.pid, self.peak_bytes = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
                out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=False).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak_bytes = max(self.peak_bytes, int(used) * 2**20)

    def finish(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_bytes


def worker_pid(server_pid: int) -> int:
    """The server's mp worker process (one rank)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat, command = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and b"workers.process" in command:
                return int(entry.name)
    raise RuntimeError("the server has no worker process")


def summary(name: str, latencies: list[float], elapsed: float, peak_bytes: int, images: dict[int, np.ndarray]) -> dict:
    return {
        "name": name,
        "images_per_s": len(latencies) / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 99),
        "peak_memory_gib": peak_bytes / 2**30,
        "images": images,
    }


def seeds(args) -> list[int]:
    return [1000 + i for i in range(args.requests)]


def timed_calls(call, args) -> tuple[list[float], dict[int, np.ndarray], float]:
    """One warm-up call, then one timed call per seed: the latencies, the images by seed, the wall time."""
    call(0)
    latencies, images = [], {}
    started = time.perf_counter()
    for seed in seeds(args):
        t0 = time.perf_counter()
        images[seed] = call(seed)
        latencies.append(time.perf_counter() - t0)
    return latencies, images, time.perf_counter() - started


# -- the raw pipeline, in a process of its own (so its memory is measured like a worker's) ---------
def raw_child(args) -> None:
    import torch

    from workers.models import load_pipeline
    from workers.worker import resolve_device, resolve_dtype

    device = resolve_device(args.device, 0)
    dtype = resolve_dtype("auto", device)
    pipeline = load_pipeline(args.model, Path(args.cache_dir), dtype, device).to(device)
    pipeline.set_progress_bar_config(disable=True)

    def call(seed: int) -> np.ndarray:
        image = pipeline(prompt=PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (image * 255).round().clip(0, 255).astype(np.uint8)

    latencies, images, elapsed = timed_calls(call, args)
    np.savez(args.raw_child, latencies=latencies, elapsed=elapsed, peak_rss=peak_rss_bytes("self"),
             **{str(s): im for s, im in images.items()})


def bench_raw(args, logs: Path) -> dict:
    out = logs / "raw.npz"
    command = [sys.executable, __file__, "--raw-child", str(out), "--model", args.model, "--size", str(args.size),
               "--steps", str(args.steps), "--device", args.device, "--requests", str(args.requests),
               "--cache-dir", args.cache_dir]
    with (logs / "raw.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        cuda_memory = PeakCudaMemory(process.pid) if args.device == "cuda" else None
        process.wait()
    peak = cuda_memory.finish() if cuda_memory else 0
    if process.returncode != 0:
        raise RuntimeError(f"raw pipeline failed: {(logs / 'raw.log').read_text()[-2000:]}")
    data = np.load(out)
    images = {s: data[str(s)] for s in seeds(args)}
    peak = peak or int(data["peak_rss"])
    return summary("raw pipeline", list(data["latencies"]), float(data["elapsed"]), peak, images)




def bench_imagegen(name: str, flags: list[str], args, logs: Path) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--model", args.model,
               "--device", args.device, "--max-batch-size", "1", "--default-size", f"{args.size}x{args.size}",
               "--default-num-inference-steps", str(args.steps), *flags]
    process = start(command, port, logs / f"{name.replace(' ', '-').replace('+', 'and')}.log", timeout_s=1800)
    try:
        worker = worker_pid(process.pid)
        cuda_memory = PeakCudaMemory(worker) if args.device == "cuda" else None
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        with httpx.Client(timeout=1800) as http:
            def post(seed: int) -> np.ndarray:
                from PIL import Image

                response = http.post(url, json={"prompt": PROMPT, "size": f"{args.size}x{args.size}",
                                                "num_inference_steps": args.steps, "seed": seed})
                response.raise_for_status()
                data = base64.b64decode(response.json()["data"][0]["b64_json"])
                return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

            latencies, images, elapsed = timed_calls(post, args)
            levers = http.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0].get("levers") or {}
        peak = cuda_memory.finish() if cuda_memory else peak_rss_bytes(worker)
        row = summary(name, latencies, elapsed, peak, images)
        row["warmup_s"] = levers.get("warmup_s")
        return row
    finally:
        stop(process)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def mean_psnr(images: dict, reference: dict) -> float:
    return float(np.mean([min(psnr(images[s], reference[s]), 99.0) for s in reference]))


# -- skip rates and quality, in this process ---------------------------------------------------------
def skip_rate(args, method: str) -> float:
    """The share of denoiser calls in which the cache skipped the denoiser's last hooked module."""
    from workers.config import OmniDiffusionConfig
    from workers.data import OmniDiffusionRequest
    from workers.worker import WorkerWrapperBase

    worker = WorkerWrapperBase(0, OmniDiffusionConfig(model=args.model, device=args.device, cache_method=method,
                                                      model_cache_dir=args.cache_dir))
    worker.initialize()
    last = list(worker.levers.cached_forwards)[-1]
    inner = next(iter(last.children()), last)
    calls = {"denoiser": 0, "inner": 0}
    worker.levers.denoiser.register_forward_pre_hook(lambda *_: calls.__setitem__("denoiser", calls["denoiser"] + 1))
    inner.register_forward_pre_hook(lambda *_: calls.__setitem__("inner", calls["inner"] + 1))
    worker.generate([OmniDiffusionRequest(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps,
                                          seed=s) for s in seeds(args)[:2]])
    worker.shutdown()
    return 1 - calls["inner"] / max(1, calls["denoiser"])


def quality(args, model: str) -> list[tuple[str, float, int]]:
    """PSNR of each cache method that hooks ``model`` against its uncached output, same seeds."""
    from workers.config import OmniDiffusionConfig
    from workers.data import OmniDiffusionRequest
    from workers.levers import CACHE_METHODS, count_hooked_modules
    from workers.worker import WorkerWrapperBase

    plain = WorkerWrapperBase(0, OmniDiffusionConfig(model=model, device=args.device, model_cache_dir=args.cache_dir))
    plain.initialize()
    denoiser = plain.levers.denoiser
    requests = [OmniDiffusionRequest(PROMPT, num_inference_steps=args.steps, seed=s) for s in seeds(args)]
    reference = {r.seed: o.images[0] for r, o in zip(requests, plain.generate(requests))}
    hooking = {m: count_hooked_modules(denoiser, m) for m in CACHE_METHODS}
    rows = []
    for method in [m for m, n in hooking.items() if n]:
        worker = WorkerWrapperBase(0, OmniDiffusionConfig(model=model, device=args.device, cache_method=method,
                                                          model_cache_dir=args.cache_dir))
        worker.initialize()
        cached = {r.seed: o.images[0] for r, o in zip(requests, worker.generate(requests))}
        rows.append((method, mean_psnr(cached, reference), hooking[method]))
        worker.shutdown()
    return rows


# -- main ---------------------------------------------------------------------------------------------
def hooking_methods(args) -> list[str]:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):  # as the workers do
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()

    from workers.levers import CACHE_METHODS, count_hooked_modules
    from workers.models import RANDOM_WEIGHT_MODELS, build_random_weight_pipeline, load_pipeline

    if args.model in RANDOM_WEIGHT_MODELS:
        pipeline = build_random_weight_pipeline(args.model, "meta", torch.float32)
    else:
        pipeline = load_pipeline(args.model, Path(args.cache_dir), torch.float32, "cpu")
    denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
    return [method for method in CACHE_METHODS if count_hooked_modules(denoiser, method)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=8, help="timed requests per row (seeds 1000, 1001, ...)")
    parser.add_argument("--compile", default="regional", choices=["regional", "full"], help="the compile rows' mode")
    parser.add_argument("--rows", default="raw,plain,caches,compile,compile+best",
                        help="comma-separated: raw, plain, caches (every method that hooks the model) or "
                        "cache:<method>, compile, compile+best or compile+<method>")
    parser.add_argument("--quality-model", help="also: PSNR of each cache that hooks this model (e.g. demo)")
    parser.add_argument("--cache-dir", default=os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or tempfile.mkdtemp())
    parser.add_argument("--json", help="also write the rows (without images) to this file")
    parser.add_argument("--raw-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = args.cache_dir
    if args.raw_child:
        raw_child(args)
        return
    logs = Path(tempfile.mkdtemp(prefix="imagegen-levers-"))
    load_before = os.getloadavg()
    wanted = [row.strip() for row in args.rows.split(",") if row.strip()]
    methods = hooking_methods(args)
    # The header first and each row as soon as it is measured: a run cut short keeps what it measured.
    print(f"model={args.model} size={args.size}x{args.size} steps={args.steps} device={args.device} batch 1, "
          f"{args.requests} requests per row, cpus={os.cpu_count()}; load average "
          f"{' '.join(f'{x:.2f}' for x in load_before)} before; logs {logs}")
    print(f"cache methods that hook {args.model}: {', '.join(methods) or 'none'}")
    print(f"{'':40} {'images/s':>9} {'x raw':>6} {'p50 s':>8} {'x p50':>6} {'p99 s':>8} {'peak GiB':>9} "
          f"{'PSNR dB':>8}  notes", flush=True)
    rows: list[dict] = []
    failed: list[str] = []
    reference: dict[str, dict] = {}  # "raw" and "plain", as they are measured

    def run(name: str, flags: list[str] | None) -> dict | None:
        try:
            row = bench_raw(args, logs) if flags is None else bench_imagegen(name, flags, args, logs)
        except Exception as error:  # noqa: BLE001 - report the other rows anyway; logs hold the details
            failed.append(f"{name} failed: {(str(error).strip().splitlines() or [repr(error)])[-1]}")
            print(failed[-1], flush=True)
            return None
        notes = []
        if "raw" in reference or flags is None:
            row["x_raw"] = row["images_per_s"] / reference.get("raw", row)["images_per_s"]
            # The median's speed-up too: a few requests slowed by other work on the machine move it less.
            row["x_raw_p50"] = reference.get("raw", row)["p50_s"] / row["p50_s"]
        if "plain" in reference:
            row["psnr_vs_plain_db"] = mean_psnr(row["images"], reference["plain"]["images"])
        elif flags == [] and "raw" in reference:
            raw_images = reference["raw"]["images"]
            differences = [np.abs(row["images"][seed].astype(int) - raw_images[seed]).max() for seed in raw_images]
            row["max_diff_vs_raw"] = int(max(differences))
            notes.append(f"max |diff| vs raw {row['max_diff_vs_raw']}")
        if "--cache-method" in (flags or []) and flags[flags.index("--cache-method") + 1] in ADAPTIVE:
            row["skip_rate"] = skip_rate(args, flags[flags.index("--cache-method") + 1])
            notes.append(f"skip rate {row['skip_rate']:.2f} (random weights: means nothing)")
        if row.get("warmup_s"):
            notes.append(f"warm-up {row['warmup_s']:.0f} s")
        psnr_text = f"{row['psnr_vs_plain_db']:8.1f}" if "psnr_vs_plain_db" in row else f"{'':8}"
        x_raw = f"{row['x_raw']:6.2f}" if "x_raw" in row else f"{'':6}"
        x_p50 = f"{row['x_raw_p50']:6.2f}" if "x_raw_p50" in row else f"{'':6}"
        print(f"{name:40} {row['images_per_s']:9.3f} {x_raw} {row['p50_s']:8.2f} {x_p50} {row['p99_s']:8.2f} "
              f"{row['peak_memory_gib']:9.2f} {psnr_text}  {'; '.join(notes)}".rstrip(), flush=True)
        rows.append(row)
        if args.json:
            plain_rows = [{key: value for key, value in r.items() if key != "images"} for r in rows]
            Path(args.json).write_text(json.dumps(plain_rows, indent=2))
        return row

    if "raw" in wanted and (row := run("raw pipeline", None)):
        reference["raw"] = row
    if "plain" in wanted or any(r.startswith(("cache", "compile+")) for r in wanted):
        if row := run("imagegen plain", []):
            reference["plain"] = row
    cache_rows = methods if "caches" in wanted else [r.split(":", 1)[1] for r in wanted if r.startswith("cache:")]
    for method in cache_rows:
        run(f"imagegen {method}", ["--cache-method", method])
    if "compile" in wanted:
        run(f"imagegen compile {args.compile}", ["--compile", args.compile])
    for combination in [r for r in wanted if r.startswith("compile+")]:
        method = combination.split("+", 1)[1]
        if method == "best":
            cached = [r for r in rows if r["name"].removeprefix("imagegen ") in methods]
            if not cached:
                failed.append("compile+best: no cache method hooks this model")
                continue
            method = max(cached, key=lambda r: r["images_per_s"])["name"].removeprefix("imagegen ")
        run(f"imagegen compile {args.compile} + {method}", ["--compile", args.compile, "--cache-method", method])
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} after the timed rows")

    if args.quality_model:
        print(f"\nquality on {args.quality_model} ({args.steps} steps, {args.requests} seeds, native size): "
              "PSNR of the cached output against the uncached one")
        for method, value, hooked in quality(args, args.quality_model):
            print(f"  {method:12} {value:6.1f} dB  ({hooked} modules hooked)")
    for line in failed:
        print(line)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
