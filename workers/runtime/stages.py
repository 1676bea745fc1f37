"""What every way of running a pipeline shares: the stage timer, latents to pixels, partial-image steps,
usage counting, and the cancellations a worker has been told of. Request mode (workers/worker.py) and
step mode (step_batching.py) both use them."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from workers.data import OmniDiffusionRequest, Usage

# Cancellations forgets old ids past this many: they belong to requests that finished before their cancel came.
_MAX_REMEMBERED_CANCELLATIONS = 4096


class Cancellations:
    """The ids of requests whose clients went away. ``add`` may run on another thread while the pipeline
    thread reads and takes them."""

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def add(self, request_ids: Iterable[str]) -> None:
        if len(self._ids) > _MAX_REMEMBERED_CANCELLATIONS:
            self._ids.clear()  # ids of requests that had already finished when cancelled
        self._ids.update(request_ids)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def cover(self, request_ids: set[str]) -> bool:
        """Whether every one of these requests is cancelled."""
        return request_ids <= self._ids

    def take(self, request_ids: Iterable[str]) -> set[str]:
        """Which of these requests were cancelled, forgetting them: they are done with here."""
        cancelled = self._ids.intersection(request_ids)
        self._ids -= cancelled  # in place: add() may be adding to this very set
        return cancelled


def partial_image_steps(wanted: int, total_steps: int) -> list[int]:
    """The steps after which each of ``wanted`` partial images is decoded, evenly spaced over
    ``total_steps`` (the last step is the final image itself, never a partial one)."""
    return sorted({(j + 1) * total_steps // (wanted + 1) for j in range(wanted)} - {0})


def decode_latents(pipeline, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The images that ``latents`` would decode to now (float HxWx3 in [0, 1], one per batch entry)."""
    vae = pipeline.vae
    if hasattr(pipeline, "_unpatchify_latents"):
        # Flux2 packs 2x2 patches into channels, places tokens by position id, and batch-normalises its
        # latents with the VAE's statistics: undo each as its own call does before decoding.
        grid = (height // (pipeline.vae_scale_factor * 2), width // (pipeline.vae_scale_factor * 2))
        ids = pipeline._prepare_latent_ids(latents.new_empty(latents.shape[0], latents.shape[2], *grid))
        latents = pipeline._unpack_latents_with_ids(latents, ids.to(latents.device), *grid)
        statistics = vae.bn.running_mean, torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
        mean, std = (value.view(1, -1, 1, 1).to(latents.device, latents.dtype) for value in statistics)
        latents = pipeline._unpatchify_latents(latents * std + mean)
    else:
        if latents.ndim == 3:  # Flux-style pipelines pack 2x2 latent patches into a sequence
            latents = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0)
    decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="np")


def to_uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


# How far (Gaussian radius, pixels) the mask is feathered before the input is pasted back outside it.
MASK_FEATHER_PX = 4


def keep_unmasked(pipeline, images: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``images`` (uint8 NxHxWx3, inpainted) with ``original``'s pixels pasted back outside ``mask``
    (255 = repainted): the VAE's round trip moves even the pixels an inpaint pipeline kept. The mask is
    feathered first (``VaeImageProcessor.blur``), so the seam does not show; away from it the kept pixels
    are the input's exactly. ``original`` and ``mask`` are resized to the output's size if they differ."""
    from diffusers.image_processor import VaeImageProcessor

    size = (images.shape[2], images.shape[1])
    init_image = Image.fromarray(original).resize(size, Image.Resampling.LANCZOS)
    feathered = VaeImageProcessor.blur(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST), MASK_FEATHER_PX)
    return np.stack(
        [np.asarray(pipeline.image_processor.apply_overlay(feathered, init_image, Image.fromarray(image)))
         for image in images]
    )


class StageTimer:
    """Times one pipeline call by stage, with forward hooks on its modules: the text encoders
    (text_encode), the UNet or transformer (denoise), and the rest of the call (vae_decode: the
    VAE decode and post-processing). On CUDA each hook synchronizes, so GPU time is counted."""

    _STAGES = {
        "text_encode": ("text_encoder", "text_encoder_2", "text_encoder_3"),
        "denoise": ("unet", "transformer"),
    }

    def __init__(self, pipeline, device: torch.device | None):
        self._pipeline = pipeline
        self._cuda = device is not None and device.type == "cuda"
        self.seconds = {"text_encode": 0.0, "denoise": 0.0, "vae_decode": 0.0}
        self._hooks: list = []

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _watch(self, module: torch.nn.Module, stage: str) -> None:
        started: list[float] = []

        def before(*_) -> None:
            started.append(self._now())

        def after(*_) -> None:
            self.seconds[stage] += self._now() - started.pop()

        self._hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def __enter__(self) -> StageTimer:
        for stage, names in self._STAGES.items():
            for name in names:
                module = getattr(self._pipeline, name, None)
                if isinstance(module, torch.nn.Module):
                    self._watch(module, stage)
        self._started = self._now()
        return self

    def __exit__(self, *exc_info: object) -> None:
        total = self._now() - self._started
        for hook in self._hooks:
            hook.remove()
        self.seconds["vae_decode"] = max(0.0, total - self.seconds["text_encode"] - self.seconds["denoise"])


def count_usage(pipeline, request: OmniDiffusionRequest) -> Usage:
    """Prompt tokens by the pipeline's (first) tokenizer; an image counts its latent positions (each input
    image at its own size: an edit model's references are not resized)."""
    tokenizer = getattr(pipeline, "tokenizer", None) or getattr(pipeline, "tokenizer_2", None)
    text_tokens = len(tokenizer(request.prompt).input_ids) if tokenizer is not None else 0
    scale = getattr(pipeline, "vae_scale_factor", 8)
    return Usage(
        text_tokens=text_tokens,
        input_image_tokens=sum((image.shape[0] // scale) * (image.shape[1] // scale) for image in request.images),
        output_image_tokens=(request.height // scale) * (request.width // scale) * request.num_images,
    )
