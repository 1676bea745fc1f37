"""WorkerWrapperBase: one device, one diffusers pipeline, and the RPC methods the executors call."""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict

import numpy as np
import torch

from workers.config import OmniDiffusionConfig
from workers.data import OmniDiffusionRequest, RequestOutput
from workers.models import resolve_model_path

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Used when a pipeline's VAE does not say which size it was trained at.
_FALLBACK_NATIVE_SIZE = 512


def resolve_device(setting: str, rank: int) -> torch.device:
    """'auto' | 'cuda' | 'cpu' -> the device for this rank (ranks wrap around the visible GPUs)."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA device is visible")
    return torch.device("cuda", rank % torch.cuda.device_count())


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def shard_requests(requests: list[OmniDiffusionRequest], num_shards: int) -> list[list[OmniDiffusionRequest]]:
    """Split one step's requests over the ranks: about equal images each, batchable requests together.

    Requests are ordered by batch key and cut into contiguous runs, so a rank gets at most a few
    groups. Every rank computes the same split from the same list, so a step is one broadcast RPC.
    """
    by_key: dict[tuple, list[OmniDiffusionRequest]] = defaultdict(list)
    for request in requests:
        by_key[request.batch_key()].append(request)
    total = sum(request.num_images for request in requests)
    shards: list[list[OmniDiffusionRequest]] = [[] for _ in range(num_shards)]
    done = 0
    for group in by_key.values():
        for request in group:
            # The rank whose share of the images holds this request's middle image.
            middle = done + request.num_images / 2
            shards[min(num_shards - 1, int(middle * num_shards / total))].append(request)
            done += request.num_images
    return shards


class WorkerWrapperBase:
    """Owns one device and the pipeline on it. Every public method is callable by name over RPC."""

    def __init__(self, rank: int, od_config: OmniDiffusionConfig):
        self.rank = rank
        self.od_config = od_config
        self.pipeline = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self._call_parameters: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self) -> dict:
        """Load the model onto this rank's device. Returns the model description."""
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library_logging in (diffusers_logging, transformers_logging):
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()
        self.device = resolve_device(self.od_config.device, self.rank)
        self.dtype = resolve_dtype(self.od_config.dtype, self.device)
        path = resolve_model_path(self.od_config.model, self.od_config.model_cache_dir)
        pipeline = DiffusionPipeline.from_pretrained(path, dtype=self.dtype)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline.to(self.device)
        self._call_parameters = set(inspect.signature(self.pipeline.__call__).parameters)
        logger.info("rank %d loaded %s from %s on %s (%s)", self.rank, type(pipeline).__name__, path, self.device, self.dtype)
        return self.describe()

    def describe(self) -> dict:
        vae_config = getattr(getattr(self.pipeline, "vae", None), "config", None)
        native = int(getattr(vae_config, "sample_size", None) or _FALLBACK_NATIVE_SIZE)
        return {
            "rank": self.rank,
            "pipeline": type(self.pipeline).__name__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "native_size": f"{native}x{native}",
        }

    def get_rank(self) -> int:
        return self.rank

    def shutdown(self) -> None:
        self.pipeline = None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation ------------------------------------------------------------------------
    def generate_shard(self, requests: list[OmniDiffusionRequest]) -> list[RequestOutput]:
        """Generate this rank's share of a step (see shard_requests)."""
        return self.generate(shard_requests(requests, self.od_config.num_gpus)[self.rank])

    def generate(self, requests: list[OmniDiffusionRequest]) -> list[RequestOutput]:
        """Generate every request, one batched pipeline call per group of compatible requests."""
        groups: dict[tuple, list[OmniDiffusionRequest]] = defaultdict(list)
        for request in requests:
            groups[request.batch_key()].append(request)
        outputs: dict[str, RequestOutput] = {}
        for group in groups.values():
            try:
                outputs.update(self._generate_group(group))
            except Exception as error:  # noqa: BLE001 - reported per request, never kills the worker
                if len(group) == 1:
                    logger.exception("rank %d: generation failed", self.rank)
                    outputs[group[0].request_id] = RequestOutput(
                        group[0].request_id, [], group[0].seed, self.rank, _describe(error)
                    )
                    continue
                # One bad request must not fail its batch-mates: retry them one by one.
                for request in group:
                    outputs[request.request_id] = self.generate([request])[0]
        return [outputs[request.request_id] for request in requests]

    @torch.inference_mode()
    def _generate_group(self, group: list[OmniDiffusionRequest]) -> dict[str, RequestOutput]:
        first = group[0]
        # 1. One prompt and one generator per image, so a seed gives the same image in any batch.
        #    CPU generators make a seed draw the same noise on every device.
        prompts = [r.prompt for r in group for _ in range(r.num_images)]
        generators = [torch.Generator().manual_seed(r.seed + i) for r in group for i in range(r.num_images)]
        kwargs: dict = {
            "prompt": prompts,
            "height": first.height,
            "width": first.width,
            "num_inference_steps": first.num_inference_steps,
            "generator": generators,
            "output_type": "np",
        }
        if first.guidance_scale is not None:
            kwargs["guidance_scale"] = first.guidance_scale
        if first.negative_prompt is not None and "negative_prompt" in self._call_parameters:
            kwargs["negative_prompt"] = [r.negative_prompt for r in group for _ in range(r.num_images)]
        # 2. Denoise and decode.
        images = self.pipeline(**kwargs).images
        # 3. float [0, 1] -> uint8, split back per request.
        pixels = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
        outputs, start = {}, 0
        for r in group:
            outputs[r.request_id] = RequestOutput(r.request_id, list(pixels[start : start + r.num_images]), r.seed, self.rank)
            start += r.num_images
        return outputs


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
