"""A rank's device and dtype, the pipeline that serves each task of a loaded model, and the image
geometry the model has (its native size and the multiple its sides must keep)."""

from __future__ import annotations

import torch

from workers.runtime.edits import EditPipeline, edit_pipelines

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
        return DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def task_pipelines(pipeline, edit: EditPipeline | None) -> dict:
    """Task (text2img, img2img, inpaint) -> the pipeline that serves it. An instruction-edit model's own
    call takes its references (workers/runtime/edits.py); a text-to-image model edits through the
    img2img and inpaint variants diffusers has for its family."""
    if edit is not None:
        return edit_pipelines(pipeline)
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    pipelines = {"text2img": pipeline}
    for task, auto_class in (("img2img", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting)):
        try:
            # from_pipe reuses the loaded modules: no second copy of the weights.
            derived = auto_class.from_pipe(pipeline)
        except ValueError:  # diffusers has no such pipeline for this model family
            continue
        derived.set_progress_bar_config(disable=True)
        pipelines[task] = derived
    return pipelines


def native_size(pipeline) -> int:
    """The side its VAE was trained at."""
    vae_config = getattr(getattr(pipeline, "vae", None), "config", None)
    return int(getattr(vae_config, "sample_size", None) or _FALLBACK_NATIVE_SIZE)


def size_multiple(pipeline) -> int:
    """What an image's sides must be multiples of: the VAE's downscale, twice that for DiT pipelines
    (they pack 2x2 latent patches into one token), and never less than 8."""
    multiple = int(getattr(pipeline, "vae_scale_factor", 8))
    if getattr(pipeline, "transformer", None) is not None:
        multiple *= 2
    return max(8, multiple)
