"""What a model takes in memory: measured on a loaded pipeline (the figure /v1/models, the metrics and the
server's memory budget read), and estimated before its first load from its modules built on the meta device.

On CUDA a loaded pipeline takes ``torch.cuda.memory_allocated`` on its device (with --offload, the peak of a
warm-up call, ``max_memory_allocated``: its weights sit on the CPU between calls); on the CPU, the storage
bytes of its parameters and buffers. A tensor subclass (torchao's quantized tensors) counts the inner tensors
it holds (``__tensor_flatten__``), never its logical size. See docs/models.md.

Once loaded, ``keep_freed_memory`` has glibc's malloc keep the memory a denoiser call frees for the next call.

Before a CUDA rank loads, ``wait_for_room_to_load`` waits (a bounded poll) until its device has the room the
model will take: the memory of a model the server unloaded to make room comes back once its workers have exited.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The longest a CUDA rank waits for its device's room before loading anyway (then CUDA's out-of-memory error,
# if the room never came, says why the load failed).
DEVICE_ROOM_WAIT_S = 30.0

# glibc's malloc gives a freed block back to the kernel when the top of its heap has more than M_TRIM_THRESHOLD
# free, and serves a block above M_MMAP_THRESHOLD with an mmap of its own, unmapped when freed; both thresholds
# adapt as it goes. A denoising iteration frees and allocates tens of MiB of activations, which came back as
# fresh zeroed pages: step mode at 64x64 on the tiny model took ~12,000 page faults and ~26 ms of system CPU per
# image, and each denoiser call ran ~30% slower than request mode's (docs/benchmarks.md, "Page faults").
# Fixed thresholds keep that memory in the heap for the next call.
MMAP_THRESHOLD_BYTES = 32 * 2**20  # the most glibc takes on 64-bit (HEAP_MAX_SIZE / 2); larger blocks stay mmaps
TRIM_THRESHOLD_BYTES = 256 * 2**20  # free memory the heap's top keeps (enough for a 64x64 iteration's reuse)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
# The user's own malloc tuning, which keep_freed_memory leaves in force.
MALLOC_TUNING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Hand the memory freed so far (loading's) back to the kernel, then have glibc's malloc keep what later calls
    free for the next ones (the thresholds above). Returns whether it did: not where the C library is not glibc,
    nor where the user tuned malloc (``MALLOC_TUNING``, or glibc.malloc tunables in ``GLIBC_TUNABLES``)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in MALLOC_TUNING) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = ctypes.CDLL(None)
    libc.malloc_trim(0)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def tensor_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """Storage bytes of ``tensor`` not counted yet (``seen`` holds storages counted). A tensor subclass
    such as torchao's Int8Tensor reports its logical size through ``.nbytes``: its inner tensors
    (``__tensor_flatten__``: qdata, scale, ...) are what it holds."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(inner, seen) for name in names if (inner := getattr(tensor, name)) is not None)
    if tensor.device.type == "meta":
        return tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def module_weight_bytes(module: torch.nn.Module, linear_only: bool = False) -> int:
    """Storage bytes of ``module``'s parameters and buffers (of its nn.Linear weights alone with ``linear_only``)."""
    seen: set[int] = set()
    if linear_only:
        return sum(tensor_bytes(m.weight, seen) for m in module.modules() if isinstance(m, torch.nn.Linear))
    return sum(tensor_bytes(t, seen) for t in [*module.parameters(), *module.buffers()])


def pipeline_modules(pipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's torch modules by component name, in the pipeline's order."""
    return {name: module for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}


def pipeline_components(folder: Path) -> dict[str, tuple[str, str]]:
    """The model folder's model_index.json: component -> (library, class name), modules only."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {
        name: (spec[0], spec[1])
        for name, spec in index.items()
        if isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers")
    }


def measure_weights(pipeline, device: torch.device, offload_peak_bytes: int | None = None) -> dict[str, Any]:
    """Bytes of every component's weights (``weight_bytes``), of its nn.Linear weights
    (``linear_weight_bytes``), and the memory the pipeline holds on ``device`` (``memory_bytes``):
    torch.cuda.memory_allocated on CUDA (``offload_peak_bytes`` instead, when offloading), the weights'
    storage bytes on the CPU."""
    modules = pipeline_modules(pipeline)
    weight_bytes = {name: module_weight_bytes(module) for name, module in modules.items()}
    if device.type == "cuda":
        memory = offload_peak_bytes if offload_peak_bytes is not None else torch.cuda.memory_allocated(device)
    else:
        seen: set[int] = set()  # components may share tensors
        memory = sum(tensor_bytes(t, seen) for m in modules.values() for t in [*m.parameters(), *m.buffers()])
    return {
        "weight_bytes": weight_bytes,
        "linear_weight_bytes": {
            name: module_weight_bytes(module, linear_only=True) for name, module in modules.items()
        },
        "memory_bytes": {str(device): memory},
    }


def estimate_pipeline_bytes(folder: Path, dtype: torch.dtype) -> int:
    """The bytes a pipeline in ``folder`` will take on one rank, before it is loaded: each component built
    from its config on the meta device (no memory, no weights read), its parameters counted in ``dtype``
    (the dtype it will load in) and its buffers at their own size."""
    import diffusers
    import transformers

    total = 0
    for name, (library, class_name) in pipeline_components(folder).items():
        model_class = getattr(diffusers if library == "diffusers" else transformers, class_name, None)
        if not (isinstance(model_class, type) and issubclass(model_class, torch.nn.Module)):
            continue  # a scheduler, a tokenizer: no weights
        with torch.device("meta"):
            if library == "diffusers":
                module = model_class.from_config(model_class.load_config(Path(folder) / name))
            else:
                module = model_class(transformers.AutoConfig.from_pretrained(Path(folder) / name))
        element_size = torch.empty((), dtype=dtype).element_size()
        total += sum(
            p.numel() * (element_size if p.is_floating_point() else p.element_size()) for p in module.parameters()
        )
        total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def estimate_model_bytes(od_config) -> int | None:
    """``estimate_pipeline_bytes`` of the model ``od_config`` names, in the dtype it will load in; None when
    its folder is not there yet (a built-in model built on first use) or it is built from configs alone."""
    from workers.models.catalog import BUILTIN_MODELS, DEMO_MODEL_PATH
    from workers.models.random_weights import RANDOM_WEIGHT_MODELS
    from workers.runtime.pipelines import resolve_device, resolve_dtype

    name = od_config.model
    if name in RANDOM_WEIGHT_MODELS:
        return None
    if name == "demo":
        folder = DEMO_MODEL_PATH
    else:
        folder = Path(od_config.model_cache_dir) / name if name in BUILTIN_MODELS else Path(name)
    if not (folder / "model_index.json").is_file():
        return None
    dtype = resolve_dtype(od_config.dtype, resolve_device(od_config.device, od_config.device_index(0)))
    return estimate_pipeline_bytes(folder, dtype)


def wait_for_device_room(device: torch.device, needed_bytes: int, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``torch.cuda.mem_get_info(device)`` (the driver's free bytes, other processes' use counted) until
    ``needed_bytes`` are free, for at most ``timeout_s``; True once they are, False when the deadline passed."""
    deadline = time.monotonic() + timeout_s
    while torch.cuda.mem_get_info(device)[0] < needed_bytes:
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def wait_for_room_to_load(od_config, device: torch.device, timeout_s: float = DEVICE_ROOM_WAIT_S) -> None:
    """On CUDA, before a rank loads its model: wait until ``device`` has the bytes the model will take (its
    meta-device estimate), so that a load right after another model's unload starts once that memory is back,
    never after a fixed sleep. Past ``timeout_s`` it logs why and lets the load go ahead. Nothing to wait for on
    the CPU (the server waits for the unloaded workers to exit), with --offload or --quantization (the
    estimate counts unquantized weights on the device), or without an estimate."""
    if device.type != "cuda" or od_config.offload != "none" or od_config.quantization != "none":
        return
    needed = estimate_model_bytes(od_config)
    if not needed:
        return
    if not wait_for_device_room(device, needed, timeout_s):
        free, total = torch.cuda.mem_get_info(device)
        logger.warning(
            "%s has %.2f GiB free of %.2f GiB after %gs; the model's weights take about %.2f GiB: loading anyway",
            device, free / 2**30, total / 2**30, timeout_s, needed / 2**30,
        )
