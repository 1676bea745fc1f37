"""LoRA adapters made in the tests: random LoRA weights (peft) on the tiny Stable Diffusion model's UNet and
text encoder, saved by diffusers as a real adapter is or in the kohya key layout, and on a tiny Flux
transformer."""

from __future__ import annotations

from pathlib import Path

from workers.models.catalog import resolve_model_path

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _adapter_layers(model_dir: Path, seed: int, rank: int) -> tuple[dict, dict]:
    """peft state dicts of random LoRA layers on fresh copies of the model's UNet and text encoder."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    torch.manual_seed(seed)
    layers = []
    for model, targets in ((unet, UNET_TARGETS), (text_encoder, TEXT_ENCODER_TARGETS)):
        # init_lora_weights=False draws both LoRA matrices at random (peft's default starts B at zero: no effect).
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
        inject_adapter_in_model(config, model)
        layers.append(get_peft_model_state_dict(model))
    return layers[0], layers[1]


def make_lora(folder: Path, model_cache: Path, seed: int, rank: int = 4) -> Path:
    """A diffusers/PEFT adapter folder (pytorch_lora_weights.safetensors) for the tiny model."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_layers, text_encoder_layers = _adapter_layers(resolve_model_path("tiny", model_cache), seed, rank)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_encoder_layers),
    )
    return folder


def make_kohya_lora(file: Path, model_cache: Path, seed: int, rank: int = 4) -> Path:
    """The same kind of adapter as one .safetensors file in the kohya key layout (lora_unet_..., lora_te1_...)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    unet_layers, text_encoder_layers = _adapter_layers(resolve_model_path("tiny", model_cache), seed, rank)
    peft_layers = {f"unet.{k}": v for k, v in unet_layers.items()}
    peft_layers.update({f"text_encoder.{k}": v for k, v in text_encoder_layers.items()})
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft_layers).items()}, file)
    return file


def make_flux_lora(folder: Path, model: str, model_cache: Path, seed: int, rank: int = 4) -> Path:
    """A diffusers/PEFT adapter folder for the transformer of a tiny Flux-family model (tiny-flux, tiny-kontext)."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(resolve_model_path(model, model_cache) / "transformer")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=UNET_TARGETS)
    inject_adapter_in_model(config, transformer)
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        folder, transformer_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer))
    )
    return folder
