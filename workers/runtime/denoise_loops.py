"""The denoising loops of step mode, one per pipeline family: each starts the requests that join together
(their prompts encoded in one call; each request's initial noise drawn from its own generators and its
own scheduler's timesteps set) and predicts the noise (or flow) of many requests in one denoiser call,
with one timestep per sample. The loop that drives them, and the running set, are in
workers/runtime/step_batching.py.

diffusers' modular pipelines do not serve here: they have no Stable Diffusion 1.x/2.x blocks, and
their Flux loop drives one scheduler over one timestep sequence per call. What each loop leaves to
the pipeline: ``encode_prompt``, latent preparation (Flux), ``prepare_extra_step_kwargs``; decoding
is workers.worker.decode_latents, the pipeline's own post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workers.data import OmniDiffusionRequest, PartialImageOutput, image_slices


@dataclass
class RunningRequest:
    """One request in a running set: its scheduler, its latents, its text conditioning, and how far it is."""

    request: OmniDiffusionRequest
    scheduler: Any
    generators: list[torch.Generator]
    latents: torch.Tensor
    # The family's per-request inputs to the denoiser, each with the request's images as batch dimension.
    conditioning: dict[str, torch.Tensor]
    extra_step_kwargs: dict[str, Any]
    step: int = 0
    partial_images: list[PartialImageOutput] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("text_encode", "denoise", "vae_decode"), 0.0)
    )
    compiled_graphs: int = 0
    # uint8 arrays once decoded, or their encodes' Futures on the serving path (workers/runtime/encoding.py).
    images: list = field(default_factory=list)
    error: str | None = None

    @property
    def total_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step]

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


class _StableDiffusionLoop:
    """StableDiffusionPipeline's denoising loop, over many requests at once (epsilon or v-prediction:
    that is the scheduler's business). Classifier-free guidance doubles the batch as the pipeline does,
    [unconditional..., conditional...]."""

    def __init__(self, pipeline, guidance_scale: float):
        self.pipeline = pipeline
        # Once: the pipeline walks every component's modules for it (about 1.5 ms on the tiny model).
        self.device = pipeline._execution_device
        self.guidance_scale = guidance_scale
        self.do_cfg = guidance_scale > 1

    def start(self, requests: list[OmniDiffusionRequest], schedulers: list, generators: list[list[torch.Generator]]):
        pipeline, device = self.pipeline, self.device
        # One text-encoder call for every request that joins now (they share the step key, so all or
        # none have a negative prompt).
        prompts = [r.prompt for r in requests for _ in range(r.num_images)]
        negatives = [r.negative_prompt for r in requests for _ in range(r.num_images)]
        positive, unconditional = pipeline.encode_prompt(
            prompts, device, 1, self.do_cfg, None if negatives[0] is None else negatives
        )
        from diffusers.utils.torch_utils import randn_tensor

        started = []
        for (request, rows), scheduler, own_generators in zip(image_slices(requests), schedulers, generators):
            scheduler.set_timesteps(request.num_inference_steps, device=device)
            shape = (
                request.num_images,
                pipeline.unet.config.in_channels,
                request.height // pipeline.vae_scale_factor,
                request.width // pipeline.vae_scale_factor,
            )
            # prepare_latents would scale by the pipeline's own scheduler, whose sigmas are those of its
            # last set_timesteps: draw as it does, and scale by this request's.
            latents = randn_tensor(shape, generator=own_generators, device=device, dtype=positive.dtype)
            conditioning = {"positive": positive[rows]}
            if self.do_cfg:
                conditioning["unconditional"] = unconditional[rows]
            started.append(RunningRequest(
                request, scheduler, own_generators, latents * scheduler.init_noise_sigma, conditioning,
                pipeline.prepare_extra_step_kwargs(own_generators, 0.0),
            ))
        return started

    def predict(self, running: list[RunningRequest]) -> torch.Tensor:
        samples = torch.cat([r.scheduler.scale_model_input(r.latents, r.timestep) for r in running])
        timesteps = torch.cat([r.timestep.expand(r.request.num_images) for r in running])
        embeddings = torch.cat([r.conditioning["positive"] for r in running])
        if self.do_cfg:
            samples, timesteps = torch.cat([samples, samples]), torch.cat([timesteps, timesteps])
            embeddings = torch.cat([torch.cat([r.conditioning["unconditional"] for r in running]), embeddings])
        prediction = self.pipeline.unet(samples, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]
        if self.do_cfg:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + self.guidance_scale * (conditional - unconditional)
        return prediction


class _FluxLoop:
    """FluxPipeline's denoising loop (flow matching on packed latents) over many requests at once.
    Guidance is an embedding when the transformer takes one; Flux's true CFG (true_cfg_scale) is
    never asked for, as in request mode."""

    def __init__(self, pipeline, guidance_scale: float):
        self.pipeline = pipeline
        self.device = pipeline._execution_device  # once, as in _StableDiffusionLoop
        self.guidance_scale = guidance_scale

    def start(self, requests: list[OmniDiffusionRequest], schedulers: list, generators: list[list[torch.Generator]]):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        pipeline, device = self.pipeline, self.device
        # One text-encoder call for every request that joins now.
        prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
            prompt=[r.prompt for r in requests for _ in range(r.num_images)], prompt_2=None, device=device,
            num_images_per_prompt=1,
        )
        started = []
        for (request, rows), scheduler, own_generators in zip(image_slices(requests), schedulers, generators):
            latents, image_ids = pipeline.prepare_latents(
                request.num_images, pipeline.transformer.config.in_channels // 4, request.height, request.width,
                prompt_embeds.dtype, device, own_generators,
            )
            steps = request.num_inference_steps
            config = scheduler.config
            sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
            mu = calculate_shift(
                latents.shape[1],
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
            if sigmas is None:
                scheduler.set_timesteps(steps, device=device, mu=mu)
            else:
                scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
            scheduler.set_begin_index(0)
            conditioning = {
                "prompt_embeds": prompt_embeds[rows], "pooled": pooled[rows], "text_ids": text_ids, "image_ids": image_ids
            }
            started.append(RunningRequest(request, scheduler, own_generators, latents, conditioning, {}))
        return started

    def predict(self, running: list[RunningRequest]) -> torch.Tensor:
        transformer = self.pipeline.transformer
        latents = torch.cat([r.latents for r in running])
        timesteps = torch.cat([r.timestep.expand(r.request.num_images).to(latents.dtype) for r in running])
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([latents.shape[0]], self.guidance_scale, device=latents.device, dtype=torch.float32)
        first = running[0].conditioning  # ids depend only on the size and the text length, shared by the set
        return transformer(
            hidden_states=latents,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=torch.cat([r.conditioning["pooled"] for r in running]),
            encoder_hidden_states=torch.cat([r.conditioning["prompt_embeds"] for r in running]),
            txt_ids=first["text_ids"],
            img_ids=first["image_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )[0]


# Pipeline class name -> its loop. Anything else runs in request mode.
STEP_LOOPS = {"StableDiffusionPipeline": _StableDiffusionLoop, "FluxPipeline": _FluxLoop}
