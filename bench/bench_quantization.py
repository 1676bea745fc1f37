"""Quantization on one pipeline, in this process: per row, the pipeline built and quantized component by
component (torchao's quantize_, as the worker does for random-weight models), then one warm-up call and
timed calls. Reports seconds per image, the weights' bytes, and the peak memory of a call: on CUDA the
peak stats are reset once the pipeline is built, then torch.cuda.max_memory_allocated over the call. See
docs/quantization.md.

    python bench/bench_quantization.py --model tiny-flux --size 128 --steps 8 --device cpu
    python bench/bench_quantization.py --model random-flux-dev --size 1024 --steps 28 --device cuda \\
        --rows bf16,int8wo,float8dq+int8wo-t5 --limit-gib 24

A row is ``plain`` (``bf16`` is the same: the model dtype), a method applied to the default components
(the denoiser and the T5/UMT5 encoders), or ``<denoiser method>+<t5 method>-t5`` (float8dq+int8wo-t5:
a float8 denoiser and an int8 T5). Rows run one after another; each pipeline is freed before the next.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_levers import psnr  # noqa: E402 - after the path set-up

PROMPT = "a red fox in the snow"


def row_methods(row: str, components: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Component -> torchao method for ``row``."""
    from workers.runtime.quantization import DENOISERS, T5_ENCODERS

    if row in ("plain", "bf16"):
        return {}
    denoiser_method, _, t5_method = row.partition("+")
    t5_method = t5_method.removesuffix("-t5") or denoiser_method
    methods = {}
    for name, (_, class_name) in components.items():
        if name in DENOISERS:
            methods[name] = denoiser_method
        elif class_name in T5_ENCODERS:
            methods[name] = t5_method
    return methods


def measure(args, row: str) -> dict:
    import torch
    from torchao.quantization import quantize_

    from workers.models.catalog import load_pipeline, model_folder
    from workers.runtime.pipelines import resolve_device, resolve_dtype
    from workers.runtime.memory import measure_weights, pipeline_components
    from workers.runtime.quantization import torchao_config

    device = resolve_device(args.device, 0)
    dtype = resolve_dtype("auto", device)
    methods = row_methods(row, pipeline_components(model_folder(args.model, Path(args.cache_dir))))
    started = time.perf_counter()
    pipeline = load_pipeline(args.model, Path(args.cache_dir), dtype, device).to(device)
    pipeline.set_progress_bar_config(disable=True)
    for component, method in methods.items():
        quantize_(getattr(pipeline, component), torchao_config(method))
    build_s = time.perf_counter() - started
    weights = measure_weights(pipeline, device)

    def call(steps: int, seed: int):
        image = pipeline(prompt=PROMPT, height=args.size, width=args.size, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return image

    call(2, 0)  # warm-up: kernels chosen, caches filled
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, images = [], []
    for seed in range(1, args.requests + 1):
        began = time.perf_counter()
        images.append(call(args.steps, seed))
        seconds.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = {
        "row": row, "methods": methods, "build_s": round(build_s, 1), "s_per_image": float(np.median(seconds)),
        "weight_bytes": sum(weights["weight_bytes"].values()), "component_bytes": weights["weight_bytes"],
        "memory_bytes": weights["memory_bytes"], "peak_call_bytes": peak,
        "images": [(image * 255).round().clip(0, 255).astype(np.uint8) for image in images],
    }
    pipeline = None  # freed before the next row is built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=1, help="timed images per row")
    parser.add_argument("--rows", default="plain,int8wo,int8dq,float8wo")
    parser.add_argument("--limit-gib", type=float, help="also say whether each row's call peaked under this")
    parser.add_argument("--cache-dir", default=os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or tempfile.mkdtemp())
    parser.add_argument("--json", help="also write the rows (without images) to this file")
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):  # as the workers do
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()
    print(f"model={args.model} size={args.size}x{args.size} steps={args.steps} device={args.device} "
          f"{args.requests} timed image(s) per row, cpus={os.cpu_count()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'row':28} {'s/image':>8} {'weights MiB':>12} {'peak call GiB':>14} {'PSNR dB':>8}  components", flush=True)
    results, reference = [], None
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        try:
            result = measure(args, row)
        except Exception as error:  # noqa: BLE001 - report the other rows anyway
            print(f"{row:28} failed: {(str(error).strip().splitlines() or [repr(error)])[-1]}", flush=True)
            continue
        images = result.pop("images")
        if reference is None and not result["methods"]:
            reference = images
        if reference is not None and result["methods"]:
            result["psnr_vs_plain_db"] = float(np.mean([min(psnr(a, b), 99.0) for a, b in zip(images, reference)]))
        peak = result["peak_call_bytes"]
        notes = ", ".join(f"{c}={m}" for c, m in result["methods"].items()) or "model dtype"
        if peak is not None and args.limit_gib:
            result["under_limit"] = peak < args.limit_gib * 2**30
            notes += f"; peak {'under' if result['under_limit'] else 'OVER'} {args.limit_gib:g} GiB"
        psnr_cell = f"{result['psnr_vs_plain_db']:8.1f}" if "psnr_vs_plain_db" in result else " " * 8
        peak_cell = f"{peak / 2**30:14.2f}" if peak is not None else f"{'':>14}"
        print(f"{row:28} {result['s_per_image']:8.2f} {result['weight_bytes'] / 2**20:12.1f} {peak_cell} "
              f"{psnr_cell}  {notes}", flush=True)
        results.append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
