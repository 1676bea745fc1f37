"""LoRA adapters on one worker's pipeline: the path checks, loading and unloading them (diffusers'
``load_lora_weights``, on peft), and switching the ones a pipeline call runs with."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from workers.data import LoraWeight

logger = logging.getLogger(__name__)

# The file diffusers' save_lora_weights writes; a folder holding it (or one .safetensors file) is an adapter.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Nothing else is read: a pickled (.bin, .pt) adapter would run code while it loads.
WEIGHT_SUFFIX = ".safetensors"


class LoraLoadError(ValueError):
    """A LoRA adapter cannot be loaded from where it was asked for; the message says why."""


def resolve_lora_path(path: str, lora_dir: Path | None) -> Path:
    """The adapter's weights file on this host: ``path`` (relative to ``lora_dir`` when given, and
    confined to it after symlinks are followed), which must exist before diffusers sees it (a
    missing path would otherwise be taken for a hub id)."""
    given = Path(path).expanduser()
    if lora_dir is not None:
        root = lora_dir.expanduser().resolve()
        found = (root / given).resolve()  # an absolute path stays itself
        if not found.is_relative_to(root):
            raise LoraLoadError(f"LoRA path '{path}' is outside --lora-dir {root}")
    else:
        found = given.resolve()
    if not found.exists():
        raise LoraLoadError(f"LoRA path '{path}' does not exist")
    if found.is_file():
        if found.suffix != WEIGHT_SUFFIX:
            raise LoraLoadError(f"LoRA path '{path}' is not a {WEIGHT_SUFFIX} file")
        return found
    if (found / DIFFUSERS_WEIGHT_NAME).is_file():
        return found / DIFFUSERS_WEIGHT_NAME
    candidates = sorted(found.glob(f"*{WEIGHT_SUFFIX}"))
    if len(candidates) != 1:
        raise LoraLoadError(
            f"LoRA folder '{path}' holds {len(candidates) or 'no'} {WEIGHT_SUFFIX} files and no {DIFFUSERS_WEIGHT_NAME}: "
            "name the file"
        )
    return candidates[0]


class LoraAdapters:
    """The adapters loaded on a pipeline (and on the pipelines that share its modules), and those in
    effect. ``activate`` before each pipeline call sets exactly what that call asked for, so an
    adapter never bleeds into a call that did not name it; the base model runs with every adapter off."""

    def __init__(self, pipeline: Any, rank: int, lora_dir: Path | None):
        self._pipeline = pipeline
        self._rank = rank
        self._lora_dir = lora_dir
        self.loaded: dict[str, dict] = {}  # name -> what load() reported
        self._active: tuple[tuple[str, float], ...] | None = None  # None: unknown, set at the next call

    def load(self, name: str, path: str, scale: float) -> dict:
        """Load adapter ``name`` from ``path``; its description (file, weight count and bytes, seconds,
        memory). Raises LoraLoadError when the path is refused or holds no LoRA for this pipeline."""
        pipeline = self._pipeline
        if not hasattr(pipeline, "load_lora_weights"):
            raise LoraLoadError(f"{type(pipeline).__name__} cannot load LoRA adapters")
        weights = resolve_lora_path(path, self._lora_dir)
        if name in self.loaded:
            # The same adapter again (a worker the server reconnects to without a restart): already there.
            if (self.loaded[name]["lora_path"], self.loaded[name]["lora_scale"]) == (str(weights), scale):
                return self.loaded[name]
            raise LoraLoadError(f"LoRA adapter '{name}' is already loaded from {self.loaded[name]['lora_path']}")
        started, rss_before = time.perf_counter(), _peak_rss_bytes()
        cuda = getattr(pipeline, "device", torch.device("cpu")).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            allocated_before = torch.cuda.memory_allocated()
        self._active = None
        try:
            # local_files_only: a local file only, never a hub lookup; the file is named, so nothing is guessed.
            pipeline.load_lora_weights(
                str(weights.parent), weight_name=weights.name, adapter_name=name, local_files_only=True
            )
        except Exception as error:  # noqa: BLE001 - any failure here means the file is not such a LoRA
            self._forget(name)
            raise LoraLoadError(
                f"'{path}' is not a LoRA adapter for {type(pipeline).__name__}: {type(error).__name__}: {error}"
            ) from error
        parameters = list(_lora_parameters(pipeline, name))
        if not parameters:
            self._forget(name)
            raise LoraLoadError(f"'{path}' is not a LoRA adapter for {type(pipeline).__name__}: no layer matched")
        description = {
            "lora_name": name,
            "lora_path": str(weights),
            "lora_scale": scale,
            "components": sorted({c for c, names in pipeline.get_list_adapters().items() if name in names}),
            "weights": len(parameters),
            "weights_bytes": sum(p.numel() * p.element_size() for p in parameters),
            "load_s": round(time.perf_counter() - started, 3),
            # The process's peak resident memory grew by this much (0: it stayed under an earlier peak).
            "peak_rss_growth_bytes": max(0, _peak_rss_bytes() - rss_before),
        }
        if cuda:
            description["cuda_peak_growth_bytes"] = torch.cuda.max_memory_allocated() - allocated_before
        self.loaded[name] = description
        logger.info(
            "rank %d loaded LoRA adapter %s from %s into %s: %d weights, %.2f MiB, peak memory +%.2f MiB, %.2fs",
            self._rank, name, weights, ", ".join(description["components"]), len(parameters),
            description["weights_bytes"] / 2**20,
            description.get("cuda_peak_growth_bytes", description["peak_rss_growth_bytes"]) / 2**20,
            description["load_s"],
        )
        return description

    def unload(self, name: str) -> bool:
        """Remove adapter ``name`` (its weights are freed); False when it was not loaded."""
        if name not in self.loaded:
            return False
        self._forget(name)
        logger.info("rank %d unloaded LoRA adapter %s", self._rank, name)
        return True

    def _forget(self, name: str) -> None:
        self._active = None
        self.loaded.pop(name, None)
        if any(name in names for names in self._pipeline.get_list_adapters().values()):
            self._pipeline.delete_adapters(name)

    def activate(self, loras: tuple[LoraWeight, ...]) -> None:
        """Make the next pipeline call run with exactly these adapters, each at its scale (None: its own),
        their effects summed (diffusers' ``set_adapters(names, weights)``), or with none. Costs nothing
        when the previous call ran the same."""
        missing = [lora.name for lora in loras if lora.name not in self.loaded]
        if missing:
            raise LoraLoadError(f"LoRA adapter '{missing[0]}' is not loaded on rank {self._rank}")
        wanted = tuple(
            (lora.name, self.loaded[lora.name]["lora_scale"] if lora.scale is None else lora.scale) for lora in loras
        )
        if wanted == self._active:
            return
        if not wanted:
            if self._pipeline.get_list_adapters():  # else no layer has an adapter to turn off
                self._pipeline.disable_lora()
        else:
            self._pipeline.enable_lora()
            names, weights = zip(*wanted)
            self._pipeline.set_adapters(list(names), adapter_weights=list(weights))
        self._active = wanted


def _lora_parameters(pipeline: Any, name: str | None):
    """The LoRA weights of adapter ``name`` (of every adapter when None) in the pipeline's LoRA-loadable modules."""
    for component in getattr(pipeline, "_lora_loadable_modules", []):
        module = getattr(pipeline, component, None)
        if not isinstance(module, torch.nn.Module):
            continue
        for parameter_name, parameter in module.named_parameters():
            if "lora_" in parameter_name and (name is None or f".{name}." in f"{parameter_name}."):
                yield parameter


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
