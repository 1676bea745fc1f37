"""The baseline a user would write by hand: FastAPI + one diffusers pipeline, one request per call.

Same API shape as imagegen (b64 PNG in the OpenAI body), no batching, no worker processes.
bench/litserve_server.py loads the model, reads the body and encodes the reply with the helpers here.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import threading
from pathlib import Path

import torch
import uvicorn
from diffusers import DiffusionPipeline
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.config import default_cache_dir  # noqa: E402
from workers.models.catalog import resolve_model_path  # noqa: E402
from workers.runtime.pipelines import resolve_device  # noqa: E402


class Body(BaseModel):
    prompt: str
    size: str = "512x512"
    num_inference_steps: int = 20
    seed: int = 0


def load_pipeline(model: str, device: torch.device) -> DiffusionPipeline:
    """The model from the cache bench_serving.py shares with imagegen, as a user would load it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache = Path(os.environ.get("IMAGEGEN_MODEL_CACHE_DIR") or default_cache_dir())
    pipeline = DiffusionPipeline.from_pretrained(resolve_model_path(model, cache), dtype=dtype).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def reply(image: Image.Image) -> dict:
    """The OpenAI images body with one b64 PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    pipeline = load_pipeline(args.model, resolve_device(args.device, 0))
    lock = threading.Lock()  # one pipeline, one caller at a time
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/images/generations")
    def generate(body: Body) -> dict:
        width, height = map(int, body.size.split("x"))
        with lock:
            image = pipeline(
                prompt=body.prompt, height=height, width=width, num_inference_steps=body.num_inference_steps,
                generator=torch.Generator().manual_seed(body.seed),
            ).images[0]
        return reply(image)

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
