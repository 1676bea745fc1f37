"""Model resolution: the shipped demo model, built-in tiny pipelines, full-size architectures with
random weights (workers.models.random_weights), local diffusers folders and cached hub ids.

The tiny models (workers.models.tiny) are built once and written with ``save_pretrained``; the demo
model is a trained diffusers folder that ships with the code. Both, like every model from a folder or
the hub, are loaded through the same ``DiffusionPipeline.from_pretrained`` path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.config import MODEL_DEFAULTS_FILE
from workers.models.random_weights import RANDOM_WEIGHT_MODELS, RANDOM_WEIGHT_MODELS_PATH, build_random_weight_pipeline
from workers.models.tiny import (
    build_tiny_flux,
    build_tiny_flux2_klein,
    build_tiny_kontext,
    build_tiny_sd,
    build_tiny_sd3,
)


class ModelNotFoundError(RuntimeError):
    """The model is neither built in, a local diffusers folder, nor in the local hub cache."""


# Trained by scripts/train_demo_model.py; its README.md is the model card.
DEMO_MODEL_PATH = Path(__file__).parent / "demo_model"


class ModelDefaults(BaseModel):
    """A model folder's imagegen.json: the defaults that suit this model. A setting that was set (a
    flag or an IMAGEGEN_ variable) wins over them, and they win over imagegen's built-in defaults."""

    model_config = ConfigDict(extra="forbid")

    default_num_inference_steps: int | None = Field(None, ge=1)
    default_guidance_scale: float | None = Field(None, ge=0)
    native_size: str | None = Field(None, pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")


def read_model_defaults(folder: Path) -> ModelDefaults:
    """The folder's imagegen.json (nothing set when it has none); ValueError naming the file when malformed."""
    path = Path(folder) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        return ModelDefaults.model_validate_json(path.read_bytes())
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in error.errors())
        raise ValueError(f"{path} is not a valid {MODEL_DEFAULTS_FILE}: {problems}") from None


def model_folder(model: str, cache_dir: Path) -> Path:
    """The folder of ``model``'s files: a random-weight model's committed configs, else its diffusers folder."""
    if model in RANDOM_WEIGHT_MODELS:
        return RANDOM_WEIGHT_MODELS_PATH / model
    return resolve_model_path(model, cache_dir)


def load_pipeline(model: str, cache_dir: Path, dtype, device, **from_pretrained_kwargs):
    """The pipeline of ``model`` in ``dtype``: random-weight models are built on ``device``; every other
    model is loaded from its folder onto the CPU (the caller places it), with ``from_pretrained_kwargs``
    (a quantization_config, a component loaded elsewhere) passed on."""
    from diffusers import DiffusionPipeline

    if model in RANDOM_WEIGHT_MODELS:
        return build_random_weight_pipeline(model, device, dtype)
    folder = resolve_model_path(model, cache_dir)
    return DiffusionPipeline.from_pretrained(folder, dtype=dtype, **from_pretrained_kwargs)


BUILTIN_MODELS: dict[str, Callable[[], object]] = {
    "tiny": build_tiny_sd,
    "tiny-flux": build_tiny_flux,
    "tiny-kontext": build_tiny_kontext,
    "tiny-flux2-klein": build_tiny_flux2_klein,
    "tiny-sd3": build_tiny_sd3,
}


def resolve_model_path(model: str, cache_dir: Path) -> Path:
    """Return a local diffusers folder for ``model``, building a built-in model on first use."""
    if model == "demo":
        return DEMO_MODEL_PATH
    if model in BUILTIN_MODELS:
        return _ensure_builtin(model, Path(cache_dir))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model '{model}' is not a built-in model (demo, {', '.join([*BUILTIN_MODELS, *RANDOM_WEIGHT_MODELS])}) "
            "and no such folder exists"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # Never download at run time: only a snapshot already in the local cache is used.
        return Path(snapshot_download(model, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ModelNotFoundError(
            f"model '{model}' is not in the local Hugging Face cache and downloads are disabled"
        ) from error


def _ensure_builtin(name: str, cache_dir: Path) -> Path:
    target = cache_dir / name
    if (target / "model_index.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build in a private folder and rename it into place: several workers may build at once,
    # and a half-written folder must never be visible under the final name.
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        pipeline = BUILTIN_MODELS[name]()
        pipeline.save_pretrained(scratch / "pipeline", safe_serialization=True)
        try:
            os.rename(scratch / "pipeline", target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
