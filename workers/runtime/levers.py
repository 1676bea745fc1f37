"""Speed levers on one loaded pipeline: placement and offload, VAE tiling and slicing, the attention
backend, a step cache and torch.compile. Each lever is a setting (workers/config.py) applied here by
``apply_levers``, the one place WorkerWrapperBase.initialize calls; every lever is diffusers' own
(``enable_model_cpu_offload``, ``vae.enable_tiling``, ``set_attention_backend``, the
``diffusers.hooks`` caches, ``compile_repeated_blocks``). What this module adds is what a server
needs around them: start-up errors for combinations that cannot work, a count of what each lever
reached, cache state that never leaks from one pipeline call into the next, a per-request switch
that turns the cache off, and a count of graphs compiled after the warm-up.

See docs/benchmarks.md ("Speed levers") for which lever reaches which pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from workers.runtime.pipelines import DTYPES

logger = logging.getLogger(__name__)

# --cache-method -> (diffusers.hooks config class, apply function). MagCache is left out: its
# mag_ratios must be calibrated per model and per step count, which no model here can do.
CACHE_METHODS = {
    "first-block": ("FirstBlockCacheConfig", "apply_first_block_cache"),
    "taylorseer": ("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
    "faster": ("FasterCacheConfig", "apply_faster_cache"),
    "pab": ("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast"),
}
# Methods that decide from the activations whether to skip: FirstBlockCache compares a mean over
# the whole batch with its threshold, so each request gets pipeline calls of its own.
ADAPTIVE_CACHE_METHODS = frozenset({"first-block"})
# Methods whose hook state lives in a cache context that the pipeline must open around each denoiser
# call (``with denoiser.cache_context("cond"):``); Flux's pipelines do, SD3's and PixArt's do not.
CONTEXT_CACHE_METHODS = frozenset({"first-block", "taylorseer"})


class LeverError(ValueError):
    """A lever cannot work with this model, device or setting; the worker does not start."""


# -- the step cache ----------------------------------------------------------------------------
def cache_config(method: str, options: dict[str, Any], denoiser: torch.nn.Module, dtype: torch.dtype,
                 current_timestep: Callable[[], Any]):
    """The diffusers config object of ``method`` from JSON ``options``, with what JSON cannot carry wired in."""
    import diffusers.hooks

    config_class = getattr(diffusers.hooks, CACHE_METHODS[method][0])
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    wired = {name for name in fields if name.endswith("_callback")}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        settable = ", ".join(sorted(name for name in fields if name not in wired))
        raise LeverError(f"--cache-options for {method} has no {', '.join(unknown)}; it takes {settable}")
    if wired & set(options):
        raise LeverError(f"--cache-options cannot set {', '.join(sorted(wired & set(options)))}: imagegen wires it")
    values = dict(options)
    for name, value in values.items():
        if isinstance(fields[name].default, torch.dtype) or name.endswith("_dtype"):
            if value not in DTYPES:
                raise LeverError(f"--cache-options {name} must be one of {', '.join(DTYPES)}, got {value!r}")
            values[name] = DTYPES[value]
    defaults: dict[str, Any] = {}
    if method == "taylorseer":
        # diffusers keeps the Taylor factors in bfloat16; on a float32 CPU pipeline the casts cost more
        # than the cache saves, so they follow the pipeline's dtype unless the options say otherwise.
        defaults["taylor_factors_dtype"] = dtype
    if method in ("faster", "pab"):
        defaults["current_timestep_callback"] = current_timestep
    if method == "pab":
        defaults["spatial_attention_block_skip_range"] = 2  # diffusers' own fallback, without its warning
    if method == "faster":
        defaults["tensor_format"] = "BCHW"  # images; diffusers defaults to video (BCFHW)
        # Flux-family denoisers (they say whether guidance is an embedding) never get a batched
        # unconditional half to skip; FasterCache must not try to split one out.
        defaults["is_guidance_distilled"] = "guidance_embeds" in denoiser.config
    return config_class(**{**defaults, **values})


def hooked_forwards(denoiser: torch.nn.Module, apply: Callable[[], None]) -> dict[torch.nn.Module, tuple]:
    """Run ``apply`` (a diffusers apply_* call) and return every module whose forward it replaced (that
    is how diffusers' HookRegistry hooks one), with its (uncached, cached) forward."""
    before = {module: module.__dict__.get("forward") for module in denoiser.modules()}
    apply()
    return {
        module: (before[module], module.__dict__.get("forward"))
        for module in denoiser.modules()
        if module.__dict__.get("forward") is not before[module]
    }


def _count_inner_hooks(denoiser: torch.nn.Module, hooked: dict) -> int:
    """Hooked modules inside the denoiser: a hook on the denoiser alone skips nothing in it (FasterCache
    hooks only the UNet itself, to skip a batched unconditional half that diffusers 0.42 fails to split)."""
    return sum(module is not denoiser for module in hooked)


def count_hooked_modules(denoiser: torch.nn.Module, method: str) -> int:
    """How many modules ``method`` hooks on a copy of ``denoiser`` built on the meta device (no memory,
    no weights). A method that fails to apply (FirstBlockCache raises IndexError on UNets) hooks none."""
    import diffusers.hooks

    with torch.device("meta"):
        copy = type(denoiser).from_config(denoiser.config)
    try:
        config = cache_config(method, {}, copy, torch.float32, lambda: 0)
        apply = getattr(diffusers.hooks, CACHE_METHODS[method][1])
        return _count_inner_hooks(copy, hooked_forwards(copy, lambda: apply(copy, config)))
    except Exception:  # noqa: BLE001 - a method that cannot apply reaches nothing
        return 0


# -- the other levers -------------------------------------------------------------------------
def _set_attention_backend(denoiser: torch.nn.Module, backend: str) -> int:
    """Set the attention backend; returns how many attention processors it reached."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = sorted(name.value for name in AttentionBackendName if not name.value.endswith("_hub"))
    if backend.endswith("_hub"):
        raise LeverError(f"attention backend {backend} downloads kernels at run time; choose one of {', '.join(names)}")
    if backend not in names:
        raise LeverError(f"unknown attention backend {backend}; choose one of {', '.join(names)}")
    processors = [module.processor for module in denoiser.modules() if hasattr(module, "processor")]
    reachable = [p for p in processors if hasattr(p, "_attention_backend")]
    if not reachable:
        kinds = ", ".join(sorted({type(p).__name__ for p in processors})) or "none"
        raise LeverError(
            f"--attention-backend cannot reach {type(denoiser).__name__}'s attention processors ({kinds}): "
            "they call torch's attention directly"
        )
    try:
        denoiser.set_attention_backend(backend)
    except (RuntimeError, ValueError) as error:  # not installed, or too old
        raise LeverError(f"attention backend {backend}: {error}") from error
    return len(reachable)


def _place(pipeline, offload: str, device: torch.device) -> None:
    if offload == "none":
        pipeline.to(device)
        return
    if device.type == "cpu":
        raise LeverError(f"--offload {offload} moves weights between the CPU and an accelerator, but the device is cpu")
    if offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    else:
        pipeline.enable_sequential_cpu_offload(device=device)


def load_device(od_config, device: torch.device) -> torch.device:
    """Where a pipeline is built before apply_levers places it: offloaded weights start on the CPU."""
    return torch.device("cpu") if od_config.offload != "none" else device


def compiled_graph_count() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# -- the levers on one pipeline -----------------------------------------------------------------
@dataclasses.dataclass
class Levers:
    """The levers in effect on one worker's pipeline (and the pipelines that share its modules)."""

    denoiser: torch.nn.Module | None = None
    cache_method: str = "none"
    # Module -> (uncached forward, cached forward): the cache is switched per call by swapping these,
    # so neither state is ever re-hooked and a compiled graph exists for each.
    cached_forwards: dict[torch.nn.Module, tuple] = dataclasses.field(default_factory=dict)
    description: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The pipeline running now: derived pipelines (img2img, inpaint) share the hooked denoiser.
    running: Any = None
    last_timestep: Any = None

    def call_key(self, request) -> tuple:
        """Requests with equal keys may share one pipeline call."""
        if self.cache_method in ADAPTIVE_CACHE_METHODS and request.cache:
            return (*request.batch_key(), request.request_id)
        return request.batch_key()

    @contextlib.contextmanager
    def pipeline_call(self, pipeline, cache: bool) -> Iterator[dict]:
        """Around one pipeline call: the cache on or off for it, its state fresh, and the graphs compiled
        during it counted (``"compiled_graphs"`` in the yielded dict)."""
        from diffusers.hooks import HookRegistry

        if self.cached_forwards:
            # diffusers resets cache state only at the end of a call that finishes, and only on
            # denoisers that are a CacheMixin (not UNets): reset before every call instead.
            HookRegistry.check_if_exists_or_initialize(self.denoiser).reset_stateful_hooks()
            for module, (uncached, cached) in self.cached_forwards.items():
                if cache:
                    module.forward = cached
                elif uncached is None:
                    module.__dict__.pop("forward", None)  # back to the class's own forward
                else:
                    module.forward = uncached
        self.running, self.last_timestep = pipeline, None
        counted = {"compiled_graphs": 0}
        before = compiled_graph_count()
        try:
            yield counted
        finally:
            counted["compiled_graphs"] = compiled_graph_count() - before
            self.running = None

    def current_timestep(self):
        """The timestep the running pipeline is denoising: its own ``current_timestep`` where it keeps one
        (Flux, SD3), else the timestep its denoiser was last called with (SD and SDXL pipelines)."""
        if hasattr(type(self.running), "current_timestep"):
            return self.running.current_timestep
        return self.last_timestep

    def record_timestep(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(timestep, torch.Tensor) and timestep.ndim:
            timestep = timestep.flatten()[0]  # one timestep per call, repeated over the batch
        self.last_timestep = timestep


def warm_up(generate: Callable[[list], list], od_config, default_size: str) -> dict[str, Any]:
    """Compile before the worker reports ready, with real requests through ``generate``: one call at the
    default size and at each --compile-warmup-sizes, with the cache on and (when there is one) off, then
    a batch of two at the default size, so that the batch dimension is compiled as dynamic here and not
    on the first batched request. Returns the seconds and graphs it took."""
    from workers.config import parse_size
    from workers.data import OmniDiffusionRequest

    started, graphs = time.perf_counter(), compiled_graph_count()
    cache_states = (True, False) if od_config.cache_method != "none" else (True,)
    calls = [(size, cache, 1) for size in dict.fromkeys([default_size, *od_config.compile_warmup_sizes])
             for cache in cache_states]
    if od_config.max_batch_size > 1:
        calls += [(default_size, cache, 2) for cache in cache_states]
    for size, cache, num_images in calls:
        width, height = parse_size(size)
        request = OmniDiffusionRequest(
            "warm-up", width=width, height=height, seed=0, num_images=num_images, cache=cache
        )
        (output,) = generate([request])
        if output.error is not None:
            raise LeverError(f"warm-up at {size} (cache {'on' if cache else 'off'}) failed: {output.error}")
    seconds = round(time.perf_counter() - started, 3)
    return {"warmup_s": seconds, "warmup_compiled_graphs": compiled_graph_count() - graphs}


def apply_levers(pipeline, od_config, device: torch.device, dtype: torch.dtype) -> Levers:
    """Place ``pipeline`` on ``device`` and apply every lever ``od_config`` turns on, in the order they
    compose: placement, VAE, attention backend, cache hooks, then compile (which traces the hooks).
    Raises LeverError for a lever that cannot work here. The compile warm-up (``warm_up``) comes later:
    it runs requests, so the worker calls it once its pipelines are ready."""
    import diffusers.hooks

    levers = Levers()
    denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    levers.denoiser = denoiser
    # 1. Placement, or offload (the weights stay on the CPU between uses).
    _place(pipeline, od_config.offload, device)
    # 2. The VAE.
    for lever, enable in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
        if getattr(od_config, lever):
            if not hasattr(getattr(pipeline, "vae", None), enable):
                raise LeverError(f"--{lever.replace('_', '-')}: {type(pipeline).__name__} has no VAE that can")
            getattr(pipeline.vae, enable)()
    # 3. Attention.
    attention_processors = None
    if od_config.attention_backend is not None:
        attention_processors = _set_attention_backend(denoiser, od_config.attention_backend)
    # 4. The step cache.
    method = od_config.cache_method
    if method != "none":
        config = cache_config(method, od_config.cache_options, denoiser, dtype, levers.current_timestep)
        if method in ("faster", "pab") and not hasattr(type(pipeline), "current_timestep"):
            denoiser.register_forward_pre_hook(levers.record_timestep, with_kwargs=True)
        apply = getattr(diffusers.hooks, CACHE_METHODS[method][1])
        try:
            levers.cached_forwards = hooked_forwards(denoiser, lambda: apply(denoiser, config))
        except Exception as error:  # noqa: BLE001 - e.g. FirstBlockCache's IndexError on a UNet
            logger.info("cache method %s failed on %s: %s", method, type(denoiser).__name__, error)
        if not _count_inner_hooks(denoiser, levers.cached_forwards):
            hooking = [other for other in CACHE_METHODS if count_hooked_modules(denoiser, other)]
            raise LeverError(
                f"--cache-method {method} hooks nothing in {type(denoiser).__name__}; "
                + (f"methods that do: {', '.join(hooking)}" if hooking else "no cache method does")
            )
        if method in CONTEXT_CACHE_METHODS and "cache_context" not in inspect.getsource(type(pipeline).__call__):
            raise LeverError(
                f"--cache-method {method} needs a pipeline that opens a cache context around its denoiser calls, "
                f"which {type(pipeline).__name__} does not; pab or faster need none"
            )
        # enable_cache would have cleared these cached lists of hooked children; apply_* does not.
        diffusers.hooks.HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
        levers.cache_method = method
    # 5. Compile, last: it traces whatever the hooks made of the forwards.
    if od_config.compile == "regional":
        try:
            denoiser.compile_repeated_blocks()
        except ValueError as error:
            raise LeverError(f"--compile regional: {error} Use --compile full.") from error
    elif od_config.compile == "full":
        denoiser.compile()
    levers.description = {
        "cache_method": method,
        "cache_hooked_modules": _count_inner_hooks(denoiser, levers.cached_forwards),
        "cache_options": dict(od_config.cache_options),
        "compile": od_config.compile,
        "attention_backend": od_config.attention_backend,
        "attention_processors": attention_processors,
        "offload": od_config.offload,
        "vae_tiling": od_config.vae_tiling,
        "vae_slicing": od_config.vae_slicing,
    }
    return levers
