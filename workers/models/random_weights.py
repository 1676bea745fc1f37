"""The random-weight models (random-sd15, random-sdxl, random-flux-dev): the published architectures,
built at load time from the config JSON in ``model_configs/`` straight on the target device and dtype,
and never written to disk. Their compute and memory per step are the real models'; their pixels mean
nothing."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from workers.models.tiny import clip_tokenizer, t5_tokenizer

# The published component configs of each random-weight model, as diffusers folders hold them.
RANDOM_WEIGHT_MODELS_PATH = Path(__file__).parent / "model_configs"
RANDOM_WEIGHT_MODELS = ("random-sd15", "random-sdxl", "random-flux-dev")
_TOKENIZERS = {"CLIPTokenizer": clip_tokenizer, "T5TokenizerFast": t5_tokenizer}


@contextlib.contextmanager
def _new_tensors_on(device, dtype):
    """Parameters created in this block are created on ``device`` in ``dtype``: no float32 copy first."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_random_weight_pipeline(name: str, device, dtype):
    """The pipeline of random-weight model ``name``, every module created on ``device`` (``"meta"`` to
    count parameters without memory) in ``dtype``, from the configs in model_configs/<name>. The weights
    come from a fixed seed, so every process builds the same ones on the same kind of device."""
    import torch

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        return _build_random_weight_pipeline(name, device, dtype)


def _build_random_weight_pipeline(name: str, device, dtype):
    import diffusers
    import transformers

    folder = RANDOM_WEIGHT_MODELS_PATH / name
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index.pop("_class_name"))
    components = {}
    for component, spec in index.items():
        if not isinstance(spec, list):  # a pipeline option, such as requires_safety_checker
            components[component] = spec
            continue
        library, class_name = spec
        if library is None:
            components[component] = None
        elif class_name in _TOKENIZERS:
            components[component] = _TOKENIZERS[class_name]()
        else:
            module_class = getattr(diffusers if library == "diffusers" else transformers, class_name)
            config_file = next((folder / component).glob("*config.json"))
            config = json.loads(config_file.read_text())
            if component == "scheduler":
                components[component] = module_class.from_config(config)
                continue
            with _new_tensors_on(device, dtype):
                if library == "diffusers":
                    model = module_class.from_config(config)
                else:
                    model = module_class(module_class.config_class(**config))
            components[component] = model.eval() if device.type == "meta" else model.to(dtype).eval()
    return pipeline_class(**components)
