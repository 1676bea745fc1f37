"""The built-in tiny pipelines (tiny, tiny-flux, tiny-kontext, tiny-flux2-klein, tiny-sd3) and the offline
tokenizers they and the random-weight models use: built from configs with a fixed seed, never from the hub."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable


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


# Qwen's ChatML turns, without Qwen3's <think> block: the tokenizer's chat template, so that pipelines
# that format their prompt with apply_chat_template run offline.
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen2_tokenizer(model_max_length: int = 512):
    """A Qwen2 byte-level BPE tokenizer with no merges (one token per byte, so any text tokenizes), its
    ChatML special tokens and a chat template, built offline."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    tokens = sorted(ByteLevel.alphabet()) + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Qwen2TokenizerFast(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[],
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


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


def tiny_vae(channels: int, latent_channels: int = 4, **options):
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
    vae = tiny_vae(32)
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
    vae = tiny_vae(
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


def build_tiny_kontext():
    """FluxKontextPipeline (instruction edits, one reference image) on tiny-flux's components."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**build_tiny_flux().components)


def build_tiny_flux2_klein():
    """Flux2KleinPipeline (instruction edits, a list of up to 16 reference images) of the same tiny size,
    with a Qwen3 text encoder."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = qwen2_tokenizer()
    # The prompt embedding stacks the hidden states the pipeline's text_encoder_out_layers name,
    # (9, 18, 27) by default: the encoder needs 27 layers, and joint_attention_dim is 3 x its width.
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # The transformer sees the VAE's latents in 2x2 patches: in_channels is 4 x latent_channels. Its
    # rotary axes (time, height, width, text position) add up to attention_head_dim.
    transformer = Flux2Transformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * 16,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    # Default initialisation makes the timestep embedding, and the shift/scale/gate it gives each block,
    # of order 0.03: the gated attention, where the prompt and the reference images reach the image
    # tokens, would change the output by under one level in 255. Weights 5x larger make both show.
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(
                ("time_guidance_embed", "double_stream_modulation", "single_stream_modulation")
            ):
                module.weight.mul_(5)
    # Two levels (2x downscale), like tiny_vae's; Flux2's VAE normalises its patched latents itself.
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return Flux2KleinPipeline(
        # The pipeline shifts its timesteps for the image size (mu), which needs dynamic shifting.
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
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
    vae = tiny_vae(
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
