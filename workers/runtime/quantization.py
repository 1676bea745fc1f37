"""Quantized weights on one worker's pipeline: the quantization configs (diffusers' and transformers' own
quantizer integrations, one config per component), the refusals of what cannot run here, a denoiser
loaded from one file (GGUF or safetensors), and the bytes each component's weights take.

``QuantizationPlan.for_config`` decides and refuses before anything loads; ``plan.load`` is the one
place the worker loads its pipeline through; ``workers.runtime.memory.measure_weights`` reports what came of
it. See docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from workers.models.catalog import load_pipeline, model_folder
from workers.runtime.memory import pipeline_components
from workers.models.random_weights import RANDOM_WEIGHT_MODELS

logger = logging.getLogger(__name__)

# --quantization -> torchao config class (torchao.quantization). int4wo is left out: torchao 0.18 needs
# a kernel package for it, and peft refuses int4 for LoRA.
TORCHAO_METHODS = {
    "int8wo": "Int8WeightOnlyConfig",
    "int8dq": "Int8DynamicActivationInt8WeightConfig",
    "float8wo": "Float8WeightOnlyConfig",
    "float8dq": "Float8DynamicActivationFloat8WeightConfig",
}
BITSANDBYTES_METHODS = ("nf4", "int8")
# Text encoders quantized by default, chosen by class: text_encoder_2 is T5 in Flux but CLIP in SDXL and SD3.
T5_ENCODERS = ("T5EncoderModel", "UMT5EncoderModel")
DENOISERS = ("transformer", "unet")
DENOISER_FILE_SUFFIXES = (".gguf", ".safetensors")


class QuantizationError(ValueError):
    """A quantization setting cannot run on this device or pipeline; the worker does not start."""


def torchao_config(method: str):
    """A fresh torchao config object (an AOBaseConfig) for ``method``."""
    import torchao.quantization

    return getattr(torchao.quantization, TORCHAO_METHODS[method])()


def component_config(method: str, library: str, dtype: torch.dtype):
    """The quantization config of one component: diffusers' class for diffusers models, transformers'
    for text encoders (diffusers' TorchAoConfig fails on T5 with an AttributeError)."""
    import diffusers
    import transformers

    module = diffusers if library == "diffusers" else transformers
    if method in TORCHAO_METHODS:
        return module.TorchAoConfig(torchao_config(method))
    if method == "nf4":
        return module.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return module.BitsAndBytesConfig(load_in_8bit=True)


@dataclasses.dataclass
class QuantizationPlan:
    """What the worker quantizes and how: ``method`` on ``components`` (name -> library), and the denoiser
    read from ``denoiser_file`` instead of the model folder when one is given."""

    method: str = "none"
    components: dict[str, str] = dataclasses.field(default_factory=dict)
    denoiser: str | None = None  # the pipeline's denoiser component: transformer or unet
    denoiser_file: Path | None = None

    @classmethod
    def for_config(cls, od_config, device: torch.device, dtype: torch.dtype) -> QuantizationPlan:
        """The plan of ``od_config`` on ``device``; QuantizationError in one line for what cannot run here."""
        method = od_config.quantization
        _check_method(method, od_config.model, device, dtype)
        folder = model_folder(od_config.model, od_config.model_cache_dir)
        components = pipeline_components(folder)
        denoiser = next((name for name in DENOISERS if name in components), None)
        plan = cls(method=method, denoiser=denoiser)
        if od_config.denoiser_file is not None:
            plan.denoiser_file = _check_denoiser_file(od_config, denoiser, folder)
        if method == "none":
            if od_config.quantize_components:
                raise QuantizationError("--quantize-components needs a --quantization method")
            return plan
        wanted = od_config.quantize_components or [
            name for name, (_, class_name) in components.items() if name == denoiser or class_name in T5_ENCODERS
        ]
        unknown = sorted(set(wanted) - set(components))
        if unknown:
            raise QuantizationError(
                f"--quantize-components {', '.join(unknown)}: {od_config.model} has no such component "
                f"(it has {', '.join(sorted(components))})"
            )
        # A GGUF denoiser keeps the file's own quantization; the method covers the other components.
        plan.components = {
            name: components[name][0] for name in wanted if not (name == denoiser and plan.from_file_format == "gguf")
        }
        return plan

    @property
    def from_file_format(self) -> str | None:
        """gguf or safetensors when the denoiser comes from --denoiser-file."""
        return None if self.denoiser_file is None else self.denoiser_file.suffix.removeprefix(".")

    def load(self, od_config, dtype: torch.dtype, device: torch.device):
        """The pipeline of ``od_config.model``, quantized as planned: through the quantizers of diffusers and
        transformers for model folders, with torchao's quantize_ for random-weight models (built with
        from_config, which no quantizer sees)."""
        model, cache_dir = od_config.model, od_config.model_cache_dir
        if model in RANDOM_WEIGHT_MODELS:
            pipeline = load_pipeline(model, cache_dir, dtype, device)
            if self.method in TORCHAO_METHODS:
                from torchao.quantization import quantize_

                for name in self.components:
                    quantize_(getattr(pipeline, name), torchao_config(self.method))
            return pipeline
        overrides: dict[str, Any] = {}
        mapping = {
            name: component_config(self.method, library, dtype)
            for name, library in self.components.items()
            if not (name == self.denoiser and self.denoiser_file is not None)
        }
        if mapping:
            from diffusers import PipelineQuantizationConfig

            # quant_mapping, one config per component: quant_backend="torchao" fails with transformers 5.
            overrides["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
        if self.denoiser_file is not None:
            overrides[self.denoiser] = self._load_denoiser_file(od_config, dtype)
        return load_pipeline(model, cache_dir, dtype, device, **overrides)

    def _load_denoiser_file(self, od_config, dtype: torch.dtype):
        import diffusers

        folder = model_folder(od_config.model, od_config.model_cache_dir)
        class_name = pipeline_components(folder)[self.denoiser][1]
        quantization_config = None
        if self.from_file_format == "gguf":
            # GGUF dequantizes with plain torch; diffusers' GGUF CUDA kernels stay off (they fetch code from the hub).
            quantization_config = diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
        elif self.denoiser in self.components and self.method in BITSANDBYTES_METHODS:
            quantization_config = component_config(self.method, "diffusers", dtype)
        try:
            denoiser = getattr(diffusers, class_name).from_single_file(
                str(self.denoiser_file), config=str(folder), subfolder=self.denoiser, torch_dtype=dtype,
                quantization_config=quantization_config, local_files_only=True,
            )
        except Exception as error:  # noqa: BLE001 - any mismatch is the same start-up error
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise QuantizationError(
                f"--denoiser-file {self.denoiser_file} does not fit {od_config.model}'s {self.denoiser} "
                f"({folder / self.denoiser / 'config.json'}): {type(error).__name__}: {reason}"
            ) from None
        if self.denoiser in self.components and self.method in TORCHAO_METHODS:
            from torchao.quantization import quantize_

            # from_single_file loads a TorchAoConfig's weights unquantized (diffusers 0.42): quantize them here.
            quantize_(denoiser, torchao_config(self.method))
        return denoiser

    def describe(self) -> dict[str, Any]:
        """The plan, for the model card: the method, what each quantized component runs, the denoiser file."""
        quantized = {name: self.method for name in self.components}
        if self.from_file_format == "gguf":
            quantized[self.denoiser] = "gguf"
        return {
            "method": self.method,
            "components": quantized,
            "denoiser_file": None if self.denoiser_file is None else str(self.denoiser_file),
        }


def _check_method(method: str, model: str, device: torch.device, dtype: torch.dtype) -> None:
    if method in BITSANDBYTES_METHODS:
        if device.type != "cuda":
            raise QuantizationError(
                f"--quantization {method} (bitsandbytes) needs a CUDA device, but the device is {device}"
            )
        if model in RANDOM_WEIGHT_MODELS:
            raise QuantizationError(
                f"--quantization {method} (bitsandbytes) quantizes while loading, and {model} is built, not loaded; "
                "use a torchao method (int8wo, float8wo, ...)"
            )
        try:
            import bitsandbytes  # noqa: F401 - only checked for
        except ImportError:
            raise QuantizationError(
                f"--quantization {method} needs bitsandbytes: pip install 'imagegen[bitsandbytes]'"
            ) from None
    if method == "float8dq":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            where = f"compute capability {capability[0]}.{capability[1]}" if capability else str(device)
            raise QuantizationError(
                f"--quantization float8dq needs a CUDA GPU of compute capability 8.9 or later, not {where}"
            )
    if method in TORCHAO_METHODS and device.type == "cpu" and dtype != torch.float32:
        # torchao turns the convolutions to the weights' dtype on the CPU, and the call fails.
        dtype_name = str(dtype).removeprefix("torch.")
        raise QuantizationError(f"--quantization {method} on the CPU runs in float32, not {dtype_name}")


def _check_denoiser_file(od_config, denoiser: str | None, folder: Path) -> Path:
    path = Path(od_config.denoiser_file).expanduser()
    if denoiser is None:
        raise QuantizationError(f"--denoiser-file {path}: {od_config.model} has no transformer or unet to load it into")
    if od_config.model in RANDOM_WEIGHT_MODELS:
        raise QuantizationError(
            f"--denoiser-file {path}: {od_config.model} is built from configs, not loaded; use a model folder"
        )
    if path.suffix not in DENOISER_FILE_SUFFIXES:
        raise QuantizationError(f"--denoiser-file {path} is not a {' or '.join(DENOISER_FILE_SUFFIXES)} file")
    if not path.is_file():
        raise QuantizationError(f"--denoiser-file {path} does not exist")
    if not (folder / denoiser / "config.json").is_file():
        raise QuantizationError(f"--denoiser-file {path}: {folder / denoiser / 'config.json'} is missing")
    if path.suffix == ".gguf" and (od_config.lora_modules or od_config.allow_runtime_lora):
        # peft would wrap GGUF's linears as plain nn.Linear layers, an untested path.
        raise QuantizationError(f"--denoiser-file {path}: LoRA adapters on a GGUF denoiser are not supported")
    return path
