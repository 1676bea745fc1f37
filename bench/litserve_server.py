"""The LitServe peer: the same model behind LitServe's dynamic batching (one worker, max batch 8).

bench_serving.py starts it like bench/naive_server.py: same body (prompt, size, num_inference_steps,
seed), same reply (a b64 PNG), on 127.0.0.1. LitServe hands `predict` up to `--max-batch-size`
requests that arrived within `--batch-timeout-ms`; one diffusers call takes one step count and one
size, so the batch runs as one call per (steps, size) group, groups in the order they first appear
in the batch. Needs the `bench` extra (`pip install -e '.[bench]'`).
"""

# No `from __future__ import annotations`: LitServe builds its endpoint from the annotation of
# decode_request (Body, validated by FastAPI), and a string annotation would not resolve.
import argparse
import functools
import os
import signal
import sys
from pathlib import Path

import litserve
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_server import Body, load_pipeline, reply  # noqa: E402

from workers.runtime.pipelines import resolve_device  # noqa: E402 - naive_server put the repository on the path


class ImagesAPI(litserve.LitAPI):
    """Text to image, batched by LitServe; torch keeps its default threads, as in the naive server."""

    def __init__(self, model: str, **options) -> None:
        super().__init__(**options)
        self.model_name = model

    def setup(self, device: str) -> None:
        self.pipeline = load_pipeline(self.model_name, torch.device(device))

    def decode_request(self, request: Body) -> Body:
        return request

    def predict(self, bodies: list[Body]) -> list:
        groups: dict[tuple[int, str], list[int]] = {}
        for index, body in enumerate(bodies):
            groups.setdefault((body.num_inference_steps, body.size), []).append(index)
        images = [None] * len(bodies)
        for (steps, size), indices in groups.items():
            width, height = map(int, size.split("x"))
            outputs = self.pipeline(
                prompt=[bodies[i].prompt for i in indices], height=height, width=width, num_inference_steps=steps,
                generator=[torch.Generator().manual_seed(bodies[i].seed) for i in indices],
            ).images
            for index, image in zip(indices, outputs):
                images[index] = image
        return images

    def encode_response(self, image) -> dict:
        return reply(image)


def stop_on_sigterm(main_pid: int, signum: int, frame) -> None:
    """SIGTERM (bench_serving's stop) takes LitServe's Ctrl+C path, which stops its API server, inference
    worker and queue manager; without it they outlive this process. The API server is forked and
    inherits this handler: there it just exits."""
    if os.getpid() != main_pid:
        sys.exit(0)
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0,
                        help="LitServe's batch window (imagegen's batch_timeout_ms was 5 until 0 became its default)")
    args = parser.parse_args()

    api = ImagesAPI(args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000,
                    api_path="/v1/images/generations")
    # One inference worker on the chosen device; timeout=False: a request may wait in LitServe's queue
    # as long as it takes (its default answers 504 after 30 s, which a 40-step queue can reach).
    server = litserve.LitServer(api, accelerator=resolve_device(args.device, 0).type, devices=1,
                                workers_per_device=1, timeout=False)
    signal.signal(signal.SIGTERM, functools.partial(stop_on_sigterm, os.getpid()))
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
