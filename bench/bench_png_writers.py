"""Which PNG writer, base64 and JSON encoder the serving path should use (issue 27), measured on one image.

Every candidate writes the same 1024x1024 RGB image; each file is read back by Pillow and must give the same
pixels, or the candidate is reported as wrong. The candidates that deflate are fed by imagegen's own writer
(workers/runtime/encoding.py), so this runs in the project's venv; candidates missing from it are skipped with
a line saying so. To compare them all, add them to it:

    .venv/bin/pip install imagecodecs zlib-ng pyvips pyvips-binary orjson
    .venv/bin/python bench/bench_png_writers.py --repeats 15

Two images: uniform noise (what the random-weight models draw: the worst case for compression) and a smooth
picture with edges (what a trained model draws). Medians of --repeats runs, one thread; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import io
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from workers.runtime.encoding import write_png


def noise_image(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def smooth_image(size: int) -> np.ndarray:
    """Gradients, a few flat shapes and mild noise: compresses like a photograph or a drawing, not like noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    picture = np.stack([x, y, 1 - (x + y) / 2], axis=-1) * 200
    picture[(x - 0.3) ** 2 + (y - 0.4) ** 2 < 0.04] = (220, 40, 40)
    picture[(abs(x - 0.7) < 0.12) & (abs(y - 0.7) < 0.12)] = (40, 60, 220)
    picture += np.random.default_rng(1).normal(0, 2, picture.shape)
    return picture.clip(0, 255).astype(np.uint8)


# -- PNG writers ------------------------------------------------------------------------------------------
def pillow(level: int) -> Callable[[np.ndarray], bytes]:
    def write(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    return write


def png_from_deflate(compress: Callable[[bytes], bytes], row_filter: str) -> Callable[[np.ndarray], bytes]:
    """imagegen's own PNG writer (workers/runtime/encoding.py) with ``compress`` (a zlib-format compressor) as its
    deflater and each row filtered by ``row_filter`` (none, or up: the difference from the row above)."""
    return lambda pixels: write_png(pixels, compress, up_filter=row_filter == "up")


# zlib-format deflaters fed by imagegen's writer: name, module, the levels tried.
DEFLATERS = (("stdlib zlib", "zlib", (1,)), ("isal", "isal.isal_zlib", (0, 1)), ("zlib-ng", "zlib_ng.zlib_ng", (1,)))


def writers() -> tuple[dict[str, Callable[[np.ndarray], bytes]], list[str]]:
    found = {"pillow level 1 (imagegen without isal)": pillow(1), "pillow level 0": pillow(0)}
    missing = []
    for name, module_name, levels in DEFLATERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(name)
            continue
        for level in levels:
            for row_filter in ("none", "up"):
                found[f"{name} level {level}, filter {row_filter}"] = png_from_deflate(
                    functools.partial(module.compress, level=level), row_filter
                )
    if importlib.util.find_spec("imagecodecs"):
        import imagecodecs

        found["imagecodecs png level 1"] = lambda p: imagecodecs.png_encode(p, level=1)
        if hasattr(imagecodecs, "spng_encode"):
            found["imagecodecs spng level 1"] = lambda p: imagecodecs.spng_encode(p, level=1)
    else:
        missing.append("imagecodecs")
    try:
        import pyvips

        def vips(pixels: np.ndarray) -> bytes:
            image = pyvips.Image.new_from_memory(pixels.tobytes(), pixels.shape[1], pixels.shape[0], 3, "uchar")
            return image.pngsave_buffer(compression=1, filter="none")

        found["pyvips compression 1"] = vips
    except (ImportError, OSError):
        missing.append("pyvips (with libvips, e.g. pyvips-binary)")
    return found, missing


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def bench_png(images: dict[str, np.ndarray], repeats: int) -> dict[str, bytes]:
    found, missing = writers()
    baseline_files = {}
    for image_name, pixels in images.items():
        print(f"\nPNG writers, {image_name} {pixels.shape[1]}x{pixels.shape[0]} (median of {repeats}):")
        print(f"{'':44} {'ms':>7} {'x pillow 1':>10} {'MB':>6}  read back")
        baseline = None
        for name, write in found.items():
            data = write(pixels)
            same = np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels)
            ms = median_ms(lambda: write(pixels), repeats)
            baseline = baseline or ms
            verdict = "same pixels" if same else "WRONG"
            print(f"{name:44} {ms:7.1f} {baseline / ms:10.2f} {len(data) / 1e6:6.2f}  {verdict}")
        baseline_files[image_name] = found["pillow level 1 (imagegen without isal)"](pixels)
    for name in missing:
        print(f"skipped: {name} not installed")
    return baseline_files


# -- base64 and JSON ---------------------------------------------------------------------------------------
def bench_base64_json(files: dict[str, bytes], repeats: int) -> None:
    for image_name, data in files.items():
        print(f"\nbase64 and JSON of the {image_name} PNG ({len(data) / 1e6:.2f} MB, median of {repeats}):")
        rows = {"stdlib base64.b64encode": lambda: base64.b64encode(data)}
        if importlib.util.find_spec("pybase64"):
            import pybase64

            rows["pybase64.b64encode"] = lambda: pybase64.b64encode(data)
        text = base64.b64encode(data).decode()
        body = {"created": 0, "data": [{"b64_json": text, "seed": 1}], "output_format": "png"}
        rows["json.dumps (stdlib)"] = lambda: json.dumps(body)
        if importlib.util.find_spec("orjson"):
            import orjson

            rows["orjson.dumps"] = lambda: orjson.dumps(body)
        if importlib.util.find_spec("pydantic"):
            from pydantic import BaseModel

            class ImageData(BaseModel):
                b64_json: str
                seed: int

            class ImagesResponse(BaseModel):
                created: int
                data: list[ImageData]
                output_format: str

            model = ImagesResponse(**body)
            rows["pydantic model_dump_json (FastAPI's)"] = model.model_dump_json
        for name, run in rows.items():
            print(f"{name:44} {median_ms(run, repeats):7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"cpus={os.cpu_count()} load average {os.getloadavg()[0]:.2f} before")
    images = {"noise": noise_image(args.size), "smooth": smooth_image(args.size)}
    files = bench_png(images, args.repeats)
    bench_base64_json(files, args.repeats)
    print(f"\nload average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
