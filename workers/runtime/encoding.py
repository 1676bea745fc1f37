"""Encoding where the pixels are made: a worker writes its final and partial images as PNG, JPEG or WebP on a
small thread pool of its own, while its pipeline thread goes on to the next denoising step, so the server
only forwards the bytes (generate_shard(encode=True), the serving path).

A call's images are encoded by ``Future``s; its host answers the call once they are done (``when_encoded``),
and a partial image goes to the host's progress sink from the pool thread that encoded it. A request's final
images wait for its partial images to have been sent, so a client never sees a partial image after the final
one.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace

import numpy as np
from PIL import Image

from workers.data import EncodedImage, OmniDiffusionRequest, PartialImageOutput, RequestOutput, WorkerProgress

try:  # ISA-L's deflate writes a 1024x1024 PNG ~20-40x faster than Pillow at level 1 (bench/bench_png_writers.py)
    from isal import isal_zlib
except ImportError:  # a platform without its wheel: Pillow writes them
    isal_zlib = None

# Pillow's format name of each output_format (OpenAI's names).
PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def write_png(
    pixels: np.ndarray, compress: Callable[[bytes], bytes] | None = None, up_filter: bool = True
) -> bytes:
    """uint8 HxWx3 ``pixels`` as an 8-bit RGB PNG: each row PNG's "up" filter (its difference from the row above,
    one numpy subtraction, which shrinks a smooth picture's deflate output by ~40%), one IDAT chunk deflated by ISA-L at
    level 1. Pillow reads it back to the same pixels; so does every PNG reader, it is plain PNG.

    ``compress`` (any zlib-format compressor) and ``up_filter=False`` (rows as they are) let
    bench/bench_png_writers.py compare deflaters and filters on this very writer."""
    height, width, _ = pixels.shape
    rows = np.empty((height, 1 + 3 * width), np.uint8)
    flat = pixels.reshape(height, 3 * width)
    if up_filter:
        rows[:, 0] = 2  # filter type up; the first row's "above" is zeros, so it is itself
        rows[0, 1:] = flat[0]
        np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps modulo 256, as the filter does
    else:
        rows[:, 0] = 0
        rows[:, 1:] = flat
    deflated = compress(rows.tobytes()) if compress else isal_zlib.compress(rows.tobytes(), 1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, adaptive, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", deflated) + _png_chunk(b"IEND", b"")


def encode_pixels(pixels: np.ndarray, output_format: str = "png", compression: int | None = None) -> EncodedImage:
    """uint8 HxWx3 ``pixels`` as a png/jpeg/webp file.

    ``compression`` is OpenAI's output_compression (0-100, default 100) for jpeg/webp; like OpenAI, lower numbers
    give smaller files, so it is Pillow's ``quality``. PNG: ``write_png`` (ISA-L), or without ISA-L Pillow at zlib
    level 1, ~2.7x faster than its default 6 for a file ~15% larger; the latency matters more than the bytes.
    """
    if output_format not in PILLOW_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(PILLOW_FORMATS)}, got {output_format!r}")
    height, width = pixels.shape[:2]
    if output_format == "png" and isal_zlib is not None and pixels.ndim == 3 and pixels.shape[2] == 3:
        return EncodedImage(write_png(np.ascontiguousarray(pixels)), output_format, compression, width, height)
    quality = 100 if compression is None else compression
    options: dict = {"compress_level": 1} if output_format == "png" else {"quality": quality}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=PILLOW_FORMATS[output_format], **options)
    return EncodedImage(buffer.getvalue(), output_format, compression, width, height)


def _timed_encode(pixels: np.ndarray, output_format: str, compression: int | None) -> tuple[EncodedImage, float]:
    started = time.perf_counter()
    encoded = encode_pixels(pixels, output_format, compression)
    return encoded, time.perf_counter() - started


class ImageEncoder:
    """A worker's encode pool. ``encode`` returns a Future of (EncodedImage, seconds); ``send_partial`` encodes
    a partial image and hands it to a sink. Pillow's encoders release the GIL, so two threads encode two images
    at once beside torch's threads."""

    def __init__(self, num_threads: int = 2):
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="imagegen-encode")
        self._lock = threading.Lock()
        # Request id -> the partial images of it still being encoded and sent.
        self._partials: dict[str, list[Future]] = {}

    def encode(self, request: OmniDiffusionRequest, images: list[np.ndarray]) -> list[Future]:
        """``request``'s final images, in its output_format and output_compression: a Future of (EncodedImage,
        seconds) each, done only once the request's partial images have been sent."""
        with self._lock:
            partials = self._partials.pop(request.request_id, [])

        def run(pixels: np.ndarray) -> tuple[EncodedImage, float]:
            # The pool takes jobs in order: the partials, submitted earlier, are running or done by now.
            wait(partials)
            return _timed_encode(pixels, request.output_format, request.output_compression)

        return [self._pool.submit(run, pixels) for pixels in images]

    def send_partial(
        self, partial: PartialImageOutput, output_format: str, compression: int | None,
        sink: Callable[[WorkerProgress], None],
    ) -> None:
        """Encode ``partial``'s images and hand it to ``sink`` (from a pool thread)."""

        with self._lock:
            earlier = list(self._partials.get(partial.request_id, []))

            def run() -> None:
                images = [_timed_encode(pixels, output_format, compression)[0] for pixels in partial.images]
                wait(earlier)  # sent in the order they were made
                sink(replace(partial, images=images))

            self._partials.setdefault(partial.request_id, []).append(self._pool.submit(run))

    def forget(self, request_id: str) -> None:
        """A request that ends without images (cancelled, failed): no final image waits for its partials."""
        with self._lock:
            self._partials.pop(request_id, None)


def pending_encodes(result: object) -> list[Future]:
    """The encodes a call's result still waits for (its outputs' images that are Futures)."""
    if not isinstance(result, list):
        return []
    return [
        image for output in result if isinstance(output, RequestOutput)
        for image in output.images if isinstance(image, Future)
    ]


def encoded(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """``outputs`` with each encode's EncodedImage in place of its Future, the encodes' seconds summed into
    ``stage_seconds["image_encode"]``, and an output whose encode failed turned into its error. Blocks until
    every encode is done."""
    done = []
    for output in outputs:
        futures = [image for image in output.images if isinstance(image, Future)]
        if not futures:
            done.append(output)
            continue
        try:
            results = [future.result() for future in futures]
        except Exception as error:  # noqa: BLE001 - reported for the request whose image it was
            done.append(replace(output, images=[], error=f"encoding its image failed: {type(error).__name__}: {error}"))
            continue
        seconds = {**output.stage_seconds, "image_encode": sum(elapsed for _, elapsed in results)}
        done.append(replace(output, images=[image for image, _ in results], stage_seconds=seconds))
    return done


def when_encoded(result: object, then: Callable[[object], None]) -> None:
    """Call ``then(result)`` with its encodes done (``encoded``): at once when there are none, else from the
    pool thread that finishes the last."""
    futures = pending_encodes(result)
    if not futures:
        then(result)
        return
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            then(encoded(result))

    for future in futures:
        future.add_done_callback(one_done)
