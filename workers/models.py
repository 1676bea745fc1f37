"""Model resolution: the shipped demo model, built-in tiny pipelines, full-size architectures with
random weights, local diffusers folders and cached hub ids.

The tiny models are built from configs with a fixed seed and written with
``save_pretrained`` once; the demo model is a trained diffusers folder that ships with
the code. Both, like every model from a folder or the hub, are loaded through the same
``DiffusionPipeline.from_pretrained`` path. The random-weight models (random-sd15, random-sdxl,
random-flux-dev) are the published architectures, built at load time from the config JSON in
``model_configs/`` straight on the target device and dtype, and never written to disk: their
compute and memory per step are the real models', their pixels mean nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ModelNotFoundError(RuntimeError):
    """The model is neither built in, a local diffusers folder, nor in the local hub cache."""


# Trained by scripts/train_demo_model.py; its README.md is the model card.
DEMO_MODEL_PATH = Path(__file__).parent / "demo_model"
# Beside model_index.json, a model folder may say which defaults suit it (docs/models.md).
MODEL_DEFAULTS_FILE = "imagegen.json"
# The published component configs of each random-weight model, as diffusers folders hold them.
RANDOM_WEIGHT_MODELS_PATH = Path(__file__).parent / "model_configs"
RANDOM_WEIGHT_MODELS = ("random-sd15", "random-sdxl", "random-flux-dev")


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


def clip_tokenizer(
    words: Iterable[str] = (), model_max_length: int = 77, synonyms: dict[str, str] | None = None
):
    """A CLIP BPE tokenizer over single bytes, so that any text tokenizes, offline; its merges
    spell each of ``words`` as one token (other words fall back to single characters).

    With ``synonyms`` (word -> one of ``words``) the tokenizer knows nothing but ``words``: its
    normalizer, saved in tokenizer.json, rewrites each synonym, drops punctuation and drops every
    other word, so a word the model never learned cannot reach its text encoder. The class is
    PreTrainedTokenizerFast, which keeps tokenizer.json's normalizer as saved (CLIPTokenizer
    rebuilds its own in code).
    """
    from tokenizers import Regex, normalizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    words = list(words)
    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Merges are appended at the lowest priority, so a word already spelled as one token
        # keeps its spelling; keep merging this word's first two pieces until it is one token.
        while len(pieces := _byte_pair_encode(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    backend = CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=model_max_length).backend_tokenizer
    if synonyms is not None:
        known = "|".join(sorted(words, key=len, reverse=True))
        backend.normalizer = normalizers.Sequence(
            [backend.normalizer]  # CLIP's own: NFC, whitespace, lower case
            + [normalizers.Replace(Regex(rf"\b{synonym}\b"), word) for synonym, word in synonyms.items()]
            + [
                normalizers.Replace(Regex(r"[^\p{L}\s]+"), " "),
                normalizers.Replace(Regex(rf"\b(?!(?:{known})\b)\p{{L}}+"), ""),
                normalizers.Replace(Regex(r"\s+"), " "),
                normalizers.Strip(),
            ]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def t5_tokenizer(model_max_length: int = 512):
    """A T5 (unigram) tokenizer over the printable ASCII characters, built offline: T5's special-token
    ids (pad 0, eos 1, unk 2), one token per character, anything else unknown."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(code) for code in range(33, 127)]
    tokenizer = Tokenizer(models.Unigram([(piece, 0.0) for piece in pieces], unk_id=2))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=model_max_length,
    )


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


def model_folder(model: str, cache_dir: Path) -> Path:
    """The folder of ``model``'s files: a random-weight model's committed configs, else its diffusers folder."""
    if model in RANDOM_WEIGHT_MODELS:
        return RANDOM_WEIGHT_MODELS_PATH / model
    return resolve_model_path(model, cache_dir)


def load_pipeline(model: str, cache_dir: Path, dtype, device):
    """The pipeline of ``model`` in ``dtype``: random-weight models are built on ``device``; every other
    model is loaded from its folder onto the CPU (the caller places it)."""
    from diffusers import DiffusionPipeline

    if model in RANDOM_WEIGHT_MODELS:
        return build_random_weight_pipeline(model, device, dtype)
    return DiffusionPipeline.from_pretrained(resolve_model_path(model, cache_dir), dtype=dtype)


def _byte_pair_encode(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply ``ranks``' merges to ``pieces`` the way BPE does: the best-ranked pair first."""
    while len(pieces) > 1:
        pair = min(itertools.pairwise(pieces), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, index = [], 0
        while index < len(pieces):
            if tuple(pieces[index:index + 2]) == pair:
                merged.append(pair[0] + pair[1])
                index += 2
            else:
                merged.append(pieces[index])
                index += 1
        pieces = merged
    return pieces


def _tiny_clip_text_encoder(vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _tiny_vae(channels: int, latent_channels: int = 4, **options):
    """A two-level VAE (2x downscale) that says it works at 64x64."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(channels, 2 * channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=channels,
        sample_size=64,
        **options,
    )


def build_tiny_sd():
    """A Stable Diffusion pipeline small enough to build and run in well under a second."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = _tiny_vae(32)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_tiny_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_flux():
    """A Flux (DiT, flow matching) pipeline of the same tiny size."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    vae = _tiny_vae(
        16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_tiny_clip_text_encoder(len(tokenizer), with_projection=False),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )


def build_tiny_sd3():
    """A Stable Diffusion 3 (DiT, flow matching) pipeline of the same tiny size. Its guidance is true
    classifier-free guidance: each step runs the transformer on the unconditional and the conditional
    halves of a doubled batch."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    tokenizer_3 = t5_tokenizer()
    # The prompt embedding is both CLIP encoders' hidden states side by side (2 x 32 wide) followed
    # by T5's tokens (joint_attention_dim wide); the pooled one is both CLIP projections (2 x 32).
    # A joint_attention_dim under 64 would crop the CLIP part.
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
    )
    vae = _tiny_vae(
        16, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5305,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_tiny_clip_text_encoder(len(tokenizer), with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_clip_text_encoder(len(tokenizer), with_projection=True),
        tokenizer_2=tokenizer,
        # A pipeline saved without T5 loads only when from_pretrained is told text_encoder_3=None.
        text_encoder_3=T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
        ),
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )


BUILTIN_MODELS: dict[str, Callable[[], object]] = {
    "tiny": build_tiny_sd,
    "tiny-flux": build_tiny_flux,
    "tiny-sd3": build_tiny_sd3,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imagegen" / "models"


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
