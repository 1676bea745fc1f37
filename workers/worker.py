"""WorkerWrapperBase: one device, one diffusers pipeline, and the RPC methods the executors call."""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from collections.abc import Callable

import torch
from PIL import Image

from workers.config import OmniDiffusionConfig
from workers.data import (
    OmniDiffusionRequest,
    PartialImageOutput,
    RequestOutput,
    StepProgress,
    WorkerProgress,
    defaults_in_force,
    image_slices,
    rank_group_share,
    with_defaults,
)
from workers.logs import adopt_library_loggers, describe_error, recent_log_buffer
from workers.models.catalog import ModelDefaults, model_folder, read_model_defaults
from workers.runtime.edits import EditPipeline, edit_kwargs, edit_pipeline, reference_limits
from workers.runtime.encoding import ImageEncoder, encoded
from workers.runtime.levers import Levers, apply_levers, load_device, warm_up
from workers.runtime.lora import LoraAdapters, LoraLoadError
from workers.runtime.memory import keep_freed_memory, measure_weights, wait_for_room_to_load
from workers.runtime.pipelines import native_size, resolve_device, resolve_dtype, size_multiple, task_pipelines
from workers.runtime.quantization import QuantizationPlan
from workers.runtime.rank_group import (
    CfgParallelHooks,
    RankGroup,
    RankGroupError,
    check_context_parallel,
    form_rank_group,
)
from workers.runtime.stages import (
    Cancellations,
    StageTimer,
    count_usage,
    decode_latents,
    keep_unmasked,
    partial_image_steps,
    to_uint8,
)
from workers.runtime.step_batching import step_mode_refusal

logger = logging.getLogger(__name__)

def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class WorkerWrapperBase:
    """Owns one device and the pipeline on it. Every public method is callable by name over RPC."""

    def __init__(self, rank: int, od_config: OmniDiffusionConfig):
        self.rank = rank
        self.od_config = od_config
        # Requests whose clients went away; cancel() adds to it from another thread while generate() runs.
        self.cancellations = Cancellations()
        self.pipeline = None
        # Task -> pipeline; img2img and inpaint share the text-to-image pipeline's modules.
        self.pipelines: dict = {}
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self._call_parameters: dict[str, dict[str, inspect.Parameter]] = {}
        # Where each partial image and StepProgress goes as soon as it is made; the host sets it for
        # each call it can stream (the mp process loop, the Ray actor). None returns the partial
        # images in the RequestOutput.
        self.progress_sink: Callable[[WorkerProgress], None] | None = None
        self._description: dict | None = None
        self._model_defaults = ModelDefaults()
        self._logs = recent_log_buffer()
        # The speed levers in effect (workers/runtime/levers.py); none until initialize() applies them.
        self.levers = Levers()
        # What initialize() quantized, and the bytes the loaded weights take (workers/runtime/quantization.py).
        self.quantization = QuantizationPlan()
        self.weights: dict = {}
        # The LoRA adapters on the pipeline; the engine loads them (load_lora_adapter) once the model is up.
        self.loras: LoraAdapters | None = None
        # The ranks this one makes each image with (None: it makes its images alone), and the hooks
        # that give it half of each CFG call.
        self.rank_group: RankGroup | None = None
        self._cfg_hooks: CfgParallelHooks | None = None
        # The edit table's entry for an instruction-edit model (workers/runtime/edits.py); None otherwise.
        self.edit: EditPipeline | None = None
        # Encodes images on the serving path (generate_shard(encode=True)) beside the pipeline thread.
        self.encoder = ImageEncoder()
        # True while a host that waits for the encodes itself runs the calls (workers.hosts.streaming.PipelineThread,
        # by workers.runtime.encoding.when_encoded): generate then answers with each encode's Future in place of an
        # image and goes on to the next call. False (a direct call): it answers with the encoded images.
        self.encodes_deferred = False

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self) -> dict:
        """Load the model onto this rank's device. Returns the model description."""
        adopt_library_loggers()
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library_logging in (diffusers_logging, transformers_logging):
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()
        self.device = resolve_device(self.od_config.device, self.od_config.device_index(self.rank))
        self.dtype = resolve_dtype(self.od_config.dtype, self.device)
        config = self.od_config
        # Read first: a malformed imagegen.json fails start-up before minutes of loading.
        self._model_defaults = read_model_defaults(model_folder(config.model, config.model_cache_dir))
        if config.ulysses_degree * config.ring_degree > 1:
            check_context_parallel(config, self.device)
        # Decided (and refused) before minutes of loading, like imagegen.json.
        self.quantization = QuantizationPlan.for_config(config, self.device, self.dtype)
        wait_for_room_to_load(config, self.device)  # a model unloaded for this one may still be handing it back
        pipeline = self.quantization.load(config, self.dtype, load_device(config, self.device))
        pipeline.set_progress_bar_config(disable=True)
        self.rank_group, self._cfg_hooks = form_rank_group(pipeline, config, self.rank, self.device)
        self.levers = apply_levers(pipeline, config, self.device, self.dtype)
        self.weights = measure_weights(pipeline, self.device)
        self.pipeline = pipeline
        self.loras = LoraAdapters(pipeline, self.rank, config.lora_dir)
        self.edit = edit_pipeline(pipeline)
        self.pipelines = task_pipelines(pipeline, self.edit)
        self._call_parameters = {
            task: dict(inspect.signature(p.__call__).parameters) for task, p in self.pipelines.items()
        }
        name = type(pipeline).__name__
        logger.info("rank %d loaded %s (%s) on %s (%s)", self.rank, name, config.model, self.device, self.dtype)
        logger.info(
            "rank %d weights (quantization %s): %s; memory on %s",
            self.rank, self.quantization.method,
            ", ".join(f"{component} {_mib(size)}" for component, size in self.weights["weight_bytes"].items()),
            ", ".join(f"{device} {_mib(size)}" for device, size in self.weights["memory_bytes"].items()),
        )
        self._description = self._describe_model()
        if config.compile != "none":
            # Before the handshake, so /ready waits for it and no client pays the compile.
            default_size = defaults_in_force(config, self._description)["size"].value
            self.levers.description.update(warm_up(self.generate, config, default_size))
        if self.device.type == "cuda" and config.offload != "none":
            self._measure_offload_peak()
        logger.info("rank %d levers: %s", self.rank, self.levers.description)
        if not keep_freed_memory():
            logger.debug("rank %d: malloc's thresholds left as they are (not glibc, or tuned by the user)", self.rank)
        return self.describe()

    def _measure_offload_peak(self) -> None:
        """With --offload the weights sit on the CPU between calls: what the model takes on its GPU is the
        peak of a call (a one-step warm-up at the default size), not what stays allocated."""
        from workers.config import parse_size

        width, height = parse_size(defaults_in_force(self.od_config, self._description)["size"].value)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.generate([OmniDiffusionRequest("warm-up", width=width, height=height, seed=0, num_inference_steps=1)])
        peak = torch.cuda.max_memory_allocated(self.device)
        self.weights = measure_weights(self.pipeline, self.device, offload_peak_bytes=peak)
        self._description["memory_bytes"] = self.weights["memory_bytes"]

    @property
    def is_group_leader(self) -> bool:
        """Whether this rank answers for its group (every rank answers for itself outside rank groups)."""
        return self.rank_group is None or self.rank_group.is_leader

    def describe(self) -> dict:
        """What the engine needs to know of the loaded model: pipeline, native size, size multiple, tasks,
        defaults, the LoRA adapters loaded. Like generate(), it loads the model first if initialize() was
        never called."""
        return {**self._loaded_description(), "lora_adapters": sorted(self.loras.loaded)}

    def fill_in(self, requests: list[OmniDiffusionRequest]) -> list[OmniDiffusionRequest]:
        """``requests`` with the fields they leave unset filled as the engine would (workers.data.with_defaults),
        loading the model first if needed. Requests from the engine come filled in already."""
        description = self._loaded_description()
        return [with_defaults(request, self.od_config, description) for request in requests]

    def group_share(
        self, requests: list[OmniDiffusionRequest], group: int | None = None, groups: tuple[int, ...] | None = None
    ) -> list[OmniDiffusionRequest]:
        """The requests of a step that this rank's group makes (workers.data.rank_group_share)."""
        return rank_group_share(requests, self.od_config, self.rank, group, groups)

    def _loaded_description(self) -> dict:
        # Hosts call initialize() first; a wrapper like the guide's MyWorkerWrapper only calls generate().
        if self._description is None:
            self.initialize()
        return self._description

    def _describe_model(self) -> dict:
        native = native_size(self.pipeline)
        return {
            "rank": self.rank,
            # The shape of its rank group, which every rank and the engine must agree on.
            "rank_group": {
                "cfg_parallel_size": self.od_config.cfg_parallel_size,
                "ulysses_degree": self.od_config.ulysses_degree,
                "ring_degree": self.od_config.ring_degree,
                "index": self.rank // self.od_config.rank_group_size,
                "rank_in_group": self.rank % self.od_config.rank_group_size,
            },
            "pipeline": type(self.pipeline).__name__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "native_size": f"{native}x{native}",
            # The model folder's imagegen.json, as workers.data.defaults_in_force reads it.
            "model_defaults": self._model_defaults.model_dump(exclude_none=True),
            "size_multiple": size_multiple(self.pipeline),
            "tasks": sorted(self.pipelines),
            "edit_model": self.edit is not None,
            "max_input_images": self.edit.max_input_images if self.edit is not None else 1,
            "reference_limits": reference_limits(self.pipeline) if self.edit is not None else {},
            # What the engine fills in when an edit names no strength: each pipeline's own default.
            "default_strength": {
                task: parameters["strength"].default
                for task, parameters in self._call_parameters.items()
                if "strength" in parameters
            },
            # The speed levers in effect; the same dict object, so the warm-up's figures show up too.
            "levers": self.levers.description,
            # What the weights take (workers/runtime/quantization.py): per component, and on the device.
            "quantization": {
                **self.quantization.describe(), "linear_weight_bytes": self.weights["linear_weight_bytes"]
            },
            "weight_bytes": self.weights["weight_bytes"],
            "memory_bytes": self.weights["memory_bytes"],
            # Why --scheduling step would run as request here (None: it can run), for the engine to say.
            "step_mode_refusal": self._step_mode_refusal(),
            # generate_shard takes encode=True (the engine asks only workers that say so: older ones send pixels).
            "encodes_images": True,
        }

    def _step_mode_refusal(self) -> str | None:
        if self.od_config.scheduling != "step":
            # Workers someone else starts (ray_external, grpc) run with their own settings.
            return f"rank {self.rank} runs --scheduling {self.od_config.scheduling}; start it with --scheduling step"
        return step_mode_refusal(self)

    def get_rank(self) -> int:
        return self.rank

    def get_logs(self, max_lines: int | None = None) -> list[str]:
        """This worker process's latest log lines (at most ``max_lines``, oldest first)."""
        lines = list(self._logs.lines)
        return lines[-max_lines:] if max_lines else lines

    # -- LoRA adapters -----------------------------------------------------------------------
    def load_lora_adapter(self, lora_name: str, lora_path: str, lora_scale: float = 1.0) -> dict:
        """Load a LoRA adapter from ``lora_path`` on this rank's host (confined to ``lora_dir`` when set).

        Returns its description (see LoraAdapters.load), or ``{"lora_name", "error"}`` when the path is
        refused or holds no LoRA for this model: plain data, the same over every transport.
        """
        self._loaded_description()
        try:
            loaded = self.loras.load(lora_name, lora_path, lora_scale)
        except LoraLoadError as error:
            return {"lora_name": lora_name, "error": str(error)}
        if self.od_config.compile != "none":
            logger.warning(
                "rank %d: with --compile, LoRA adapter %s recompiles the denoiser on its first request and first "
                "change of scale, and past torch._dynamo's recompile_limit the blocks run uncompiled "
                "(docs/benchmarks.md, 'LoRA adapters and compile')", self.rank, lora_name,
            )
        return loaded

    def unload_lora_adapter(self, lora_name: str) -> bool:
        """Remove a LoRA adapter and free its weights; False when it was not loaded here."""
        self._loaded_description()
        return self.loras.unload(lora_name)

    def shutdown(self) -> None:
        self._description = None
        self.pipeline = None
        if self.rank_group is not None:
            self.rank_group.leave()
            self.rank_group = None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation ------------------------------------------------------------------------
    def cancel(self, request_ids: list[str]) -> None:
        """Drop these requests: a pipeline call whose requests are all dropped stops denoising at
        the next step, and in a running set (step mode) each leaves at the next iteration. Safe to
        call from another thread while generate() runs."""
        self.cancellations.add(request_ids)

    def generate_shard(
        self,
        requests: list[OmniDiffusionRequest],
        group: int | None = None,
        groups: tuple[int, ...] | None = None,
        encode: bool = False,
    ) -> list[RequestOutput]:
        """Generate this rank's group's share of a step (see group_shares: all of it for ``group``, none
        for the other groups; shared by ``groups`` only, when some are out of service). ``encode`` (the
        engine's serving path): as generate."""
        return self.generate(self.group_share(requests, group, groups), encode)

    def generate(self, requests: list[OmniDiffusionRequest], encode: bool = False) -> list[RequestOutput]:
        """Generate every request, one batched pipeline call per group of compatible requests.

        Fields a request leaves unset are filled as the engine would (workers.data.with_defaults);
        requests from the engine come filled in already. Images are uint8 arrays; with ``encode``, a group
        leader's final and partial images are the files (EncodedImage) of each request's output_format,
        encoded on this worker's encode pool while the next call runs.
        """
        outputs = self._generate(requests, encode)
        return outputs if self.encodes_deferred else encoded(outputs)

    def _generate(self, requests: list[OmniDiffusionRequest], encode: bool) -> list[RequestOutput]:
        requests = self.fill_in(requests)
        groups: dict[tuple, list[OmniDiffusionRequest]] = defaultdict(list)
        for request in requests:
            key = self.levers.call_key(request)
            if self.edit is not None and not self.edit.batches_references and request.images:
                key = (*key, request.request_id)  # its references go to every prompt of a call: one request per call
            groups[key].append(request)
        outputs: dict[str, RequestOutput] = {}
        for group in groups.values():
            try:
                outputs.update(self._generate_group(group, encode and self.is_group_leader))
            except RankGroupError:
                raise  # the group is broken: no request of this call can be made until it is formed anew
            except Exception as error:  # noqa: BLE001 - reported per request, never kills the worker
                if len(group) == 1:
                    logger.exception("rank %d: generation failed", self.rank)
                    self.encoder.forget(group[0].request_id)
                    outputs[group[0].request_id] = RequestOutput(
                        group[0].request_id, [], group[0].seed, self.rank, describe_error(error)
                    )
                    continue
                # One bad request must not fail its batch-mates: retry them one by one.
                for request in group:
                    outputs[request.request_id] = self._generate([request], encode)[0]
        return [outputs[request.request_id] for request in requests]

    @torch.inference_mode()
    def _generate_group(self, group: list[OmniDiffusionRequest], encode: bool) -> dict[str, RequestOutput]:
        first = group[0]
        pipeline = self.pipelines[first.task]
        parameters = self._call_parameters[first.task]
        # 1. One prompt and one generator per image, so a seed gives the same image in any batch.
        #    CPU generators make a seed draw the same noise on every device.
        prompts = [r.prompt for r in group for _ in range(r.num_images)]
        generators = [torch.Generator().manual_seed(seed) for r in group for seed in r.image_seeds()]
        kwargs: dict = {
            "prompt": prompts,
            "num_inference_steps": first.num_inference_steps,
            "generator": generators,
            "output_type": "np",
        }
        if "height" in parameters:  # img2img pipelines take the size from the image
            kwargs.update(height=first.height, width=first.width)
        if first.guidance_scale is not None:
            kwargs["guidance_scale"] = first.guidance_scale
        if first.negative_prompt is not None and "negative_prompt" in parameters:
            kwargs["negative_prompt"] = [r.negative_prompt for r in group for _ in range(r.num_images)]
        # 2. The images to start from, and (inpainting) where to repaint.
        if self.edit is not None:
            kwargs.update(edit_kwargs(self.edit, group, parameters, first.input_fidelity))
        elif first.images:
            kwargs["image"] = [Image.fromarray(r.images[0]) for r in group for _ in range(r.num_images)]
            kwargs["strength"] = first.strength
        if first.mask is not None:
            kwargs["mask_image"] = [Image.fromarray(r.mask) for r in group for _ in range(r.num_images)]
        # Progress goes to the host's sink at once; without one, partial images wait for the reply.
        # A rank group's progress is its leader's.
        progress: list[WorkerProgress] = []
        if "callback_on_step_end" in parameters:
            sink = (self.progress_sink or progress.append) if self.is_group_leader else None
            # Partial images are encoded only when a host streams them; a reply that carries them carries pixels.
            kwargs["callback_on_step_end"] = self._step_callback(group, sink, encode and self.progress_sink is not None)
        if self._cfg_hooks is not None:
            self._cfg_hooks.images_in_call = len(prompts)
        # 3. Denoise and decode, with the group's LoRA adapters (or none) in effect.
        self.loras.activate(first.loras)
        with self.levers.pipeline_call(pipeline, first.cache) as call, StageTimer(pipeline, self.device) as timer:
            images = pipeline(**kwargs).images
        cancelled = self.cancellations.take(r.request_id for r in group)
        # 4. float [0, 1] -> uint8, split back per request and image; an inpainted image keeps its input's
        #    pixels outside the mask (post-processing that needs pixels comes before the encode).
        pixels = to_uint8(images)
        outputs = {}
        for r, own in image_slices(group):
            compiled_graphs = call["compiled_graphs"] if r is first else 0  # counted once per call
            if r.request_id in cancelled:
                self.encoder.forget(r.request_id)
                outputs[r.request_id] = RequestOutput(
                    r.request_id, [], r.seed, self.rank, "cancelled: the client went away",
                    compiled_graphs=compiled_graphs,
                )
                continue
            if r.mask is not None and self.od_config.inpaint_keep_unmasked:
                pixels[own] = keep_unmasked(pipeline, pixels[own], r.images[0], r.mask)
            images = list(pixels[own])
            if encode:  # 5. on the encode pool, while the pipeline thread goes on
                images = self.encoder.encode(r, images)
            outputs[r.request_id] = RequestOutput(
                r.request_id,
                images,
                r.seed,
                self.rank,
                partial_images=[
                    p for p in progress if isinstance(p, PartialImageOutput) and p.request_id == r.request_id
                ],
                usage=count_usage(pipeline, r),
                stage_seconds=timer.seconds,
                compiled_graphs=compiled_graphs,
            )
        return outputs

    def _step_callback(
        self, group: list[OmniDiffusionRequest], sink: Callable[[WorkerProgress], None] | None, encode: bool
    ):
        """A callback_on_step_end that stops the call once every request in it is cancelled, hands
        a StepProgress of each request that asked for ``progress`` to ``sink``, and decodes the
        latents at the ``partial_images`` evenly spaced steps the group asked for, handing each
        request its share to ``sink`` at once (no ``sink``: no progress, no partial images); with
        ``encode``, a host's sink gets them from the encode pool, encoded.

        In a rank group the ranks decide to stop as one, at the same step: one rank never stops
        while its peer waits for it in a collective."""
        first = group[0]
        request_ids = {r.request_id for r in group}

        def on_step_end(pipeline, index: int, timestep, tensors: dict) -> dict:
            stop = self.cancellations.cover(request_ids)
            if self.rank_group is not None and self.rank_group.any(stop):
                stop = True
                self.cancellations.add(request_ids)  # a peer saw the cancellation first
            if stop:
                pipeline._interrupt = True  # diffusers skips the remaining denoising steps
                return {}
            if sink is None:
                return {}
            # num_timesteps is the steps this call really runs (fewer than asked for img2img).
            total = pipeline.num_timesteps
            for r in group:
                if r.progress and r.request_id not in self.cancellations:
                    sink(StepProgress(r.request_id, index + 1, total))
            if first.partial_images:
                steps = partial_image_steps(first.partial_images, total)
                if index + 1 in steps:
                    pixels = to_uint8(decode_latents(pipeline, tensors["latents"], first.height, first.width))
                    for r, own in image_slices(group):
                        if r.request_id not in self.cancellations:
                            partial = PartialImageOutput(r.request_id, steps.index(index + 1), list(pixels[own]))
                            self.send_partial(partial, r, sink, encode)
            return {}

        return on_step_end

    def send_partial(
        self, partial: PartialImageOutput, request: OmniDiffusionRequest, sink: Callable[[WorkerProgress], None],
        encode: bool,
    ) -> None:
        """Hand ``partial`` (pixels) to ``sink``: with ``encode``, from the encode pool, encoded as ``request``
        asks; else at once, as it is."""
        if encode:
            self.encoder.send_partial(partial, request.output_format, request.output_compression, sink)
        else:
            sink(partial)
