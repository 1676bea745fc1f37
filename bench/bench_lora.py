"""LoRA benchmark: what serving adapters costs one worker (WorkerWrapperBase, in this process).

1. Seconds per pipeline call of the base model before any adapter is loaded, then (taking turns) of
   the base model with two adapters loaded (all off) and of each adapter, as ratios to the first
   (same run, same seeds; each adapter call switches adapters, as alternating traffic does).
2. With --compile: the graphs torch.compile makes on each call of a sequence that switches between
   the base model, two adapters and two scales, after the start-up warm-up (each one a recompile).

    python bench/bench_lora.py                       # tiny, 64x64, 4 steps, CPU
    python bench/bench_lora.py --compile regional    # also the recompiles per switch

The adapters are random LoRA weights (rank 4) on the UNet and text encoder, made as the tests make
them (tests/lora_adapters.py); the numbers mean nothing for pixels, only for cost. See
docs/benchmarks.md ("LoRA adapters").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lora_adapters import make_lora  # noqa: E402

from workers.config import OmniDiffusionConfig  # noqa: E402
from workers.data import LoraWeight, OmniDiffusionRequest  # noqa: E402
from workers.worker import WorkerWrapperBase  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per row (after one untimed)")
    parser.add_argument("--compile", choices=["none", "regional", "full"], default="none")
    args = parser.parse_args()

    config = OmniDiffusionConfig(model=args.model, compile=args.compile, max_batch_size=1)
    worker = WorkerWrapperBase(0, config)
    worker.initialize()

    def call(**fields) -> tuple[float, int]:
        request = OmniDiffusionRequest(
            "a red fox", width=args.size, height=args.size, num_inference_steps=args.steps, seed=1, **fields
        )
        started = time.perf_counter()
        (output,) = worker.generate([request])
        assert output.error is None, output.error
        return time.perf_counter() - started, output.compiled_graphs

    def seconds(rows: dict[str, dict]) -> dict[str, float]:
        """Median seconds per call of each row, the rows taking turns (other work on a shared machine
        then slows each alike)."""
        for fields in rows.values():
            call(**fields)
        times: dict[str, list[float]] = {row: [] for row in rows}
        for _ in range(args.calls):
            for row, fields in rows.items():
                times[row].append(call(**fields)[0])
        return {row: statistics.median(values) for row, values in times.items()}

    base_alone = seconds({"base": {}})["base"] if args.compile == "none" else None
    a, b = {"loras": (LoraWeight("a"),)}, {"loras": (LoraWeight("b"),)}
    with tempfile.TemporaryDirectory(prefix="imagegen-lora-bench-") as folder:
        for name, seed in (("a", 1), ("b", 2)):
            make_lora(Path(folder) / name, config.model_cache_dir, seed)
            report = worker.load_lora_adapter(name, str(Path(folder) / name))
            print(f"loaded {name}: {report['weights']} weights, {report['weights_bytes'] / 2**20:.2f} MiB, {report['load_s']}s")
        if base_alone is not None:
            rows = {"base, no adapter loaded": base_alone, **seconds(
                {"base, 2 adapters loaded": {}, "adapter a": a, "adapter b": b}
            )}
            print(f"\n{'row':28s} {'s/call':>8s} {'ratio':>6s}")
            for row, value in rows.items():
                print(f"{row:28s} {value:8.3f} {value / base_alone:6.2f}")
            return
        print(f"\nwarm-up: {worker.levers.description['warmup_s']}s, {worker.levers.description['warmup_compiled_graphs']} graphs")
        print(f"{'call':16s} {'s':>7s} {'graphs':>6s}")
        sequence = [("base", {}), ("a", a), ("a", a), ("b", b),
                    ("a at 0.5", {"loras": (LoraWeight("a", 0.5),)}), ("a at 0.7", {"loras": (LoraWeight("a", 0.7),)}),
                    ("base", {}), ("b", b), ("a", a)]
        for label, fields in sequence:
            elapsed, graphs = call(**fields)
            print(f"{label:16s} {elapsed:7.2f} {graphs:6d}")


if __name__ == "__main__":
    main()
