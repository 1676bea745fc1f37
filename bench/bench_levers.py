"""Speed-lever benchmark: the raw diffusers pipeline vs `imagegen serve` plain, with each step cache,
with compile, and with compile + the best cache, measured in one run and printed as ratios to the raw
pipeline of that run, with each cached row's PSNR against the uncached (plain) output for the same
seeds. One client sends one image at a time (batch 1). Loopback only; bounded counts. See
docs/benchmarks.md ("Speed levers").

By default the rows run one after the other, each with only its own process alive (what a GPU's
memory allows). `--interleave` starts them all, then sends each seed to every row in turn (the
order rotating from seed to seed), so that other work on a shared machine slows every row alike.

    python bench/bench_levers.py                                   # tiny-flux, 128x128, 20 steps, CPU
    python bench/bench_levers.py --interleave                      # the same, rows interleaved
    python bench/bench_levers.py --model random-flux-dev --size 1024 --steps 28 --device cuda \\
        --rows raw,plain,compile+taylorseer
    python bench/bench_levers.py --quality-model demo              # also: PSNR of each cache on the demo model
    python bench/bench_levers.py --rows plain,quant                # each --quantization method that runs here

A quantized row (``quant`` or ``quant:<method>``) also reports the bytes of the worker's weights (the
/v1/models card's ``weight_bytes``, summed) and its PSNR against the unquantized (plain) output.

Peak memory is the worker's (or the raw pipeline process's): peak resident set on CPU, the peak
that nvidia-smi reports for that process on CUDA. Adaptive caches (first-block) are also reported
with their skip rate, which on random weights means nothing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
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

from workers.runtime.levers import ADAPTIVE_CACHE_METHODS as ADAPTIVE  # noqa: E402

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
            if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and b"workers.hosts.process" in command:
                return int(entry.name)
    raise RuntimeError("the server has no worker process")


def seeds(args) -> list[int]:
    return [1000 + i for i in range(args.requests)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def mean_psnr(images: dict, reference: dict) -> float:
    return float(np.mean([min(psnr(images[s], reference[s]), 99.0) for s in reference]))


# -- rows: one process each, asked for one image at a time ------------------------------------------
class Row:
    """One configuration under test: ``start()`` its process, ``call(seed)`` for one image (timed here),
    ``finish()`` for its peak memory, ``stop()``."""

    cache_method: str | None = None

    def __init__(self, name: str, args, logs: Path):
        self.name, self.args, self.logs = name, args, logs
        self.latencies: list[float] = []
        self.images: dict[int, np.ndarray] = {}
        self.elapsed = 0.0  # the sum of its timed calls
        self.pid: int | None = None
        self._cuda_memory: PeakCudaMemory | None = None
        self.result: dict = {"name": name}

    def start(self) -> None:
        self.pid = self._start()
        self._cuda_memory = PeakCudaMemory(self.pid) if self.args.device == "cuda" else None
        self._image(0)  # warm-up, untimed

    def call(self, seed: int) -> None:
        started = time.perf_counter()
        self.images[seed] = self._image(seed)
        self.latencies.append(time.perf_counter() - started)
        self.elapsed += self.latencies[-1]

    def finish(self) -> dict:
        peak = self._cuda_memory.finish() if self._cuda_memory else peak_rss_bytes(self.pid)
        self.result.update(
            images_per_s=len(self.latencies) / self.elapsed,
            p50_s=statistics.median(self.latencies),
            p99_s=percentile(self.latencies, 99),
            peak_memory_gib=peak / 2**30,
        )
        return self.result


class RawRow(Row):
    """The diffusers pipeline, called directly in a process of its own (``--raw-child``), so that its
    memory is measured like a worker's; seeds in on stdin, each image's file name back on stdout."""

    def _start(self) -> int:
        args = self.args
        command = [sys.executable, __file__, "--raw-child", str(self.logs), "--model", args.model,
                   "--size", str(args.size), "--steps", str(args.steps), "--device", args.device,
                   "--cache-dir", args.cache_dir]
        self.log = (self.logs / "raw.log").open("w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        return self.process.pid

    def _image(self, seed: int) -> np.ndarray:
        self.process.stdin.write(f"{seed}\n")
        self.process.stdin.flush()
        for line in iter(self.process.stdout.readline, ""):  # a library may print to stdout too: skip it
            if line.strip().endswith(".npy"):
                return np.load(line.strip())
        raise RuntimeError(f"raw pipeline failed: {(self.logs / 'raw.log').read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)
        self.log.close()


class ServerRow(Row):
    """`imagegen serve` with ``flags``, one request of one image at a time."""

    def __init__(self, name: str, args, logs: Path, flags: list[str]):
        super().__init__(name, args, logs)
        self.flags = flags
        if "--cache-method" in flags:
            self.cache_method = flags[flags.index("--cache-method") + 1]

    def _start(self) -> int:
        args = self.args
        self.port = free_port()
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), "--model", args.model,
                   "--device", args.device, "--max-batch-size", "1", "--default-size", f"{args.size}x{args.size}",
                   "--default-num-inference-steps", str(args.steps), *self.flags]
        log = self.logs / f"{self.name.replace(' ', '-').replace('+', 'and')}.log"
        self.process = start(command, self.port, log, timeout_s=1800)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=1800)
        card = self.http.get("/v1/models").json()["data"][0]
        self.result["warmup_s"] = (card.get("levers") or {}).get("warmup_s")
        self.result["weight_bytes"] = sum((card.get("weight_bytes") or {}).values())
        return worker_pid(self.process.pid)

    def _image(self, seed: int) -> np.ndarray:
        from PIL import Image

        response = self.http.post("/v1/images/generations", json={
            "prompt": PROMPT, "size": f"{self.args.size}x{self.args.size}", "num_inference_steps": self.args.steps,
            "seed": seed,
        })
        response.raise_for_status()
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def stop(self) -> None:
        self.http.close()
        stop(self.process)


def raw_child(args) -> None:
    """The raw row's process: build the pipeline, then one image per seed read from stdin."""
    import torch

    from workers.models.catalog import load_pipeline
    from workers.runtime.pipelines import resolve_device, resolve_dtype

    device = resolve_device(args.device, 0)
    dtype = resolve_dtype("auto", device)
    pipeline = load_pipeline(args.model, Path(args.cache_dir), dtype, device).to(device)
    pipeline.set_progress_bar_config(disable=True)
    for line in sys.stdin:
        seed = int(line)
        image = pipeline(prompt=PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        path = Path(args.raw_child) / f"raw-{seed}.npy"
        np.save(path, (image * 255).round().clip(0, 255).astype(np.uint8))
        print(path, flush=True)


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
    from workers.runtime.levers import CACHE_METHODS, count_hooked_modules
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

    from workers.models.catalog import load_pipeline
    from workers.models.random_weights import RANDOM_WEIGHT_MODELS, build_random_weight_pipeline
    from workers.runtime.levers import CACHE_METHODS, count_hooked_modules

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
                        "cache:<method>, compile, compile+best or compile+<method>, quant (each torchao "
                        "--quantization method that runs on the device) or quant:<method>")
    parser.add_argument("--quality-model", help="also: PSNR of each cache that hooks this model (e.g. demo)")
    parser.add_argument("--cache-dir", default=os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or tempfile.mkdtemp())
    parser.add_argument("--json", help="also write the rows (without images) to this file")
    parser.add_argument("--interleave", action="store_true",
                        help="start every row, then send each seed to each row in turn (not with compile+best)")
    parser.add_argument("--raw-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["IMAGEGEN_MODEL_CACHE_DIR"] = args.cache_dir
    if args.raw_child:
        raw_child(args)
        return
    wanted = [row.strip() for row in args.rows.split(",") if row.strip()]
    if args.interleave and "compile+best" in wanted:
        parser.error("--interleave cannot pick the best cache before measuring it: name it, as compile+taylorseer")
    logs = Path(tempfile.mkdtemp(prefix="imagegen-levers-"))
    load_before = os.getloadavg()
    methods = hooking_methods(args)
    # The header first and each row as soon as it is measured: a run cut short keeps what it measured.
    print(f"model={args.model} size={args.size}x{args.size} steps={args.steps} device={args.device} batch 1, "
          f"{args.requests} requests per row, {'interleaved' if args.interleave else 'one row after another'}, "
          f"cpus={os.cpu_count()}; load average {' '.join(f'{x:.2f}' for x in load_before)} before; logs {logs}")
    print(f"cache methods that hook {args.model}: {', '.join(methods) or 'none'}")
    print(f"{'':40} {'images/s':>9} {'x raw':>6} {'p50 s':>8} {'x p50':>6} {'p99 s':>8} {'peak GiB':>9} "
          f"{'PSNR dB':>8}  notes", flush=True)
    results: list[dict] = []
    failed: list[str] = []
    reference: dict[str, Row] = {}  # the raw and plain rows, once measured

    def report(row: Row) -> None:
        result, notes = row.finish(), []
        raw, plain = reference.get("raw", row if isinstance(row, RawRow) else None), reference.get("plain")
        if raw is not None:
            result["x_raw"] = result["images_per_s"] / raw.result["images_per_s"]
            # The median's speed-up too: a few requests slowed by other work on the machine move it less.
            result["x_raw_p50"] = raw.result["p50_s"] / result["p50_s"]
        if plain is not None:
            result["psnr_vs_plain_db"] = mean_psnr(row.images, plain.images)
        elif isinstance(row, ServerRow) and not row.flags and "raw" in reference:
            result["max_diff_vs_raw"] = int(max(
                np.abs(row.images[seed].astype(int) - image).max() for seed, image in reference["raw"].images.items()
            ))
            notes.append(f"max |diff| vs raw {result['max_diff_vs_raw']}")
        if row.cache_method in ADAPTIVE:
            result["skip_rate"] = skip_rate(args, row.cache_method)
            notes.append(f"skip rate {result['skip_rate']:.2f} (random weights: means nothing)")
        if result.get("weight_bytes"):
            notes.append(f"weights {result['weight_bytes'] / 2**20:.1f} MiB")
        if result.get("warmup_s"):
            notes.append(f"warm-up {result['warmup_s']:.0f} s")
        def cell(key: str, width: int, digits: int) -> str:
            return f"{result[key]:{width}.{digits}f}" if key in result else " " * width

        print(f"{row.name:40} {result['images_per_s']:9.3f} {cell('x_raw', 6, 2)} {result['p50_s']:8.2f} "
              f"{cell('x_raw_p50', 6, 2)} {result['p99_s']:8.2f} {result['peak_memory_gib']:9.2f} "
              f"{cell('psnr_vs_plain_db', 8, 1)}  {'; '.join(notes)}".rstrip(), flush=True)
        if isinstance(row, RawRow):
            reference["raw"] = row
        elif not row.flags:
            reference["plain"] = row
        results.append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    def attempt(row: Row, step) -> bool:
        try:
            step()
            return True
        except Exception as error:  # noqa: BLE001 - report the other rows anyway; logs hold the details
            failed.append(f"{row.name} failed: {(str(error).strip().splitlines() or [repr(error)])[-1]}")
            print(failed[-1], flush=True)
            with contextlib.suppress(Exception):
                row.stop()
            return False

    def measure(rows: list[Row]) -> None:
        """Start ``rows``, give each the same seeds (in turn when interleaved), report, stop."""
        if args.interleave:
            rows = [row for row in rows if attempt(row, row.start)]
            for index, seed in enumerate(seeds(args)):
                for row in rows[index % len(rows):] + rows[:index % len(rows)]:
                    if row in rows and not attempt(row, lambda r=row, s=seed: r.call(s)):
                        rows.remove(row)
            for row in rows:
                if attempt(row, lambda r=row: report(r)):
                    row.stop()
            return
        for row in rows:
            if attempt(row, row.start) and attempt(row, lambda r=row: [r.call(seed) for seed in seeds(args)]):
                if attempt(row, lambda r=row: report(r)):
                    row.stop()

    rows: list[Row] = []
    if "raw" in wanted:
        rows.append(RawRow("raw pipeline", args, logs))
    if "plain" in wanted or any(r.startswith(("cache", "compile+", "quant")) for r in wanted):
        rows.append(ServerRow("imagegen plain", args, logs, []))
    cache_rows = methods if "caches" in wanted else [r.split(":", 1)[1] for r in wanted if r.startswith("cache:")]
    rows += [ServerRow(f"imagegen {method}", args, logs, ["--cache-method", method]) for method in cache_rows]
    if "compile" in wanted:
        rows.append(ServerRow(f"imagegen compile {args.compile}", args, logs, ["--compile", args.compile]))
    quant_rows = [r.split(":", 1)[1] for r in wanted if r.startswith("quant:")]
    if "quant" in wanted:
        # float8dq needs a GPU of compute capability 8.9; bitsandbytes (nf4, int8) is not measured here.
        quant_rows += ["int8wo", "int8dq", "float8wo", *(["float8dq"] if args.device == "cuda" else [])]
    rows += [ServerRow(f"imagegen {method}", args, logs, ["--quantization", method]) for method in quant_rows]
    combined = [r.split("+", 1)[1] for r in wanted if r.startswith("compile+")]
    if args.interleave:
        rows += [ServerRow(f"imagegen compile {args.compile} + {m}", args, logs, ["--compile", args.compile,
                                                                                  "--cache-method", m])
                 for m in combined]
        combined = []
    measure(rows)
    for method in combined:  # one after another: "best" is known by now
        if method == "best":
            cached = [r for r in results if r["name"].removeprefix("imagegen ") in methods]
            if not cached:
                failed.append("compile+best: no cache method hooks this model")
                continue
            method = max(cached, key=lambda r: r["images_per_s"])["name"].removeprefix("imagegen ")
        flags = ["--compile", args.compile, "--cache-method", method]
        measure([ServerRow(f"imagegen compile {args.compile} + {method}", args, logs, flags)])
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
