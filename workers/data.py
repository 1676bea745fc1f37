"""Requests and per-request results as they cross the engine → executor → worker boundary."""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workers.config import MODEL_DEFAULTS_FILE, OmniDiffusionConfig, parse_size


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA adapter a request runs with, by name, at ``scale`` (None: the adapter's own)."""

    name: str
    scale: float | None = None


@dataclass(frozen=True)
class OmniDiffusionRequest:
    """One request for ``num_images`` images: text-to-image, or an edit when ``images`` are given.

    Fields left as None are filled from the config by the engine before a worker sees them.
    ``seed`` is an int (image ``i`` is drawn with ``seed + i``) or one seed per image.
    ``images`` are uint8 HxWx3 arrays, in order: for a text-to-image model, the one image to start
    from, at the request's size; for an instruction-edit model, its references (up to the model's
    ``max_input_images``), each at its own size. ``mask`` (uint8 HxW, 255 = repaint) turns an edit
    into inpainting. ``partial_images`` asks for that many intermediate
    decodes at evenly spaced denoising steps; ``progress`` for a StepProgress after every step.
    ``loras`` are the loaded LoRA adapters it runs with together (none: the base model), always held in
    one canonical order, by name, so the same set is the same key and the same pixels whatever order
    it was written in.
    """

    prompt: str
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | tuple[int, ...] | None = None
    num_images: int = 1
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Arrays compare element-wise, so they stay out of the generated __eq__.
    images: tuple[np.ndarray, ...] = field(default=(), compare=False, repr=False)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    partial_images: int = 0
    progress: bool = False
    # False runs it without the step cache (--cache-method); such requests never share a call with cached ones.
    cache: bool = True
    # The LoRA adapters it runs with, and at what scales (empty: the base model).
    loras: tuple[LoraWeight, ...] = ()
    # OpenAI's input_fidelity for edit models ("low" lets Kontext resize its reference; workers/runtime/edits.py).
    input_fidelity: str | None = None
    # The file the worker encodes each image to on the serving path (generate_shard(encode=True)): png, jpeg or
    # webp, and OpenAI's output_compression (0-100, jpeg and webp; None: 100). The pipeline call ignores both.
    output_format: str = "png"
    output_compression: int | None = None

    def __post_init__(self):
        # Frozen: the canonical order is set once, here. The adapters' weighted sum is added in this order.
        object.__setattr__(self, "loras", tuple(sorted(self.loras, key=lambda lora: lora.name)))
        object.__setattr__(self, "images", tuple(self.images))

    @property
    def task(self) -> str:
        """Which pipeline serves it: text2img, img2img or inpaint."""
        if not self.images:
            return "text2img"
        return "img2img" if self.mask is None else "inpaint"

    def image_seeds(self) -> list[int]:
        """The seed of each image (``seed`` must have been filled in)."""
        if isinstance(self.seed, tuple):
            return list(self.seed)
        return [self.seed + i for i in range(self.num_images)]

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (*self.step_key(), self.num_inference_steps, self.partial_images)

    def step_key(self) -> tuple:
        """Requests with equal keys can share denoiser calls in step mode (workers/runtime/step_batching.py),
        whatever their step counts and partial images: each has its own scheduler and decodes its own."""
        return (
            self.height,
            self.width,
            self.guidance_scale,
            self.negative_prompt is not None,
            self.task,
            self.strength,
            self.input_fidelity,
            self.cache,
            # Adapters are switched per denoiser call: different sets or scales never share one.
            self.loras,
        )


# Denoising steps when neither a setting nor the model folder's imagegen.json names any.
BUILT_IN_NUM_INFERENCE_STEPS = 20


@dataclass(frozen=True)
class Default:
    """A default in force: its value, and where it comes from (a setting, the model folder's
    imagegen.json, the model itself, or imagegen's built-in default)."""

    value: Any
    source: str


def defaults_in_force(od_config: OmniDiffusionConfig, model_info: dict) -> dict[str, Default]:
    """What a request that names nothing runs with: a setting that was set (flag or IMAGEGEN_
    variable) first, then the model folder's imagegen.json (reported in ``model_info``, a
    worker's ``describe()``), then imagegen's built-in default. Guidance None leaves the
    pipeline's own."""
    from_file = model_info["model_defaults"]

    def first(setting: str, in_file: str, otherwise: Default) -> Default:
        if getattr(od_config, setting) is not None:
            return Default(getattr(od_config, setting), "setting")
        if from_file.get(in_file) is not None:
            return Default(from_file[in_file], MODEL_DEFAULTS_FILE)
        return otherwise

    return {
        "num_inference_steps": first(
            "default_num_inference_steps", "default_num_inference_steps",
            Default(BUILT_IN_NUM_INFERENCE_STEPS, "built-in"),
        ),
        "guidance_scale": first("default_guidance_scale", "default_guidance_scale", Default(None, "the pipeline's")),
        # The model's own: its VAE's sample size.
        "size": first("default_size", "native_size", Default(model_info["native_size"], "model")),
    }


def with_defaults(
    request: OmniDiffusionRequest, od_config: OmniDiffusionConfig, model_info: dict
) -> OmniDiffusionRequest:
    """``request`` with every field it leaves unset filled in; the one place that decides defaults.

    The engine calls it once per request before a step goes out, so every rank sees the same
    values (the same seed above all); a worker called directly fills whatever is still unset by
    the same rules. ``model_info`` is a worker's ``describe()``.

    - size: the first input image's own size, else the default size in force (defaults_in_force);
    - steps and guidance: the defaults in force (guidance None leaves the pipeline's own);
    - seed: a random one; strength (edits): the pipeline's own default for the task.
    """
    defaults = defaults_in_force(od_config, model_info)
    if request.images:
        default_height, default_width = request.images[0].shape[:2]
    else:
        default_width, default_height = parse_size(defaults["size"].value)
    strength = request.strength
    if strength is None and request.images:
        strength = model_info["default_strength"].get(request.task)
    guidance = request.guidance_scale
    return dataclasses.replace(
        request,
        width=request.width or default_width,
        height=request.height or default_height,
        num_inference_steps=request.num_inference_steps or defaults["num_inference_steps"].value,
        guidance_scale=guidance if guidance is not None else defaults["guidance_scale"].value,
        seed=request.seed if request.seed is not None else random.randint(0, 2**31 - 1),
        strength=strength,
    )


@dataclass
class Usage:
    """What a request consumed: prompt tokens (the pipeline's tokenizer) and image tokens (latent positions)."""

    text_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0


@dataclass(frozen=True)
class EncodedImage:
    """An image as a worker encoded it (generate_shard(encode=True)): the file's bytes, its format (png, jpeg,
    webp), the output_compression it was written with, and its size. The bytes are what the server sends."""

    data: bytes = field(repr=False)
    format: str
    compression: int | None
    width: int
    height: int


# A worker's image: uint8 HxWx3 pixels, or the file it encoded them to (the serving path).
WorkerImage = np.ndarray | EncodedImage


@dataclass
class PartialImageOutput:
    """Partial image ``index`` of each of a request's images, decoded mid-denoising (uint8 HxWx3, or encoded
    on the serving path)."""

    request_id: str
    index: int
    images: list[WorkerImage]


@dataclass(frozen=True)
class StepProgress:
    """A request has had ``step`` of its ``total_steps`` denoising steps (fewer than asked for img2img)."""

    request_id: str
    step: int
    total_steps: int


@dataclass(frozen=True)
class RunningSetIteration:
    """One iteration of a worker's running set (step mode): the requests left in it, how many joined, and
    ``finishing``, the ids of the requests with at most ``FINISHING_STEPS`` steps left. A worker host sends it
    like progress, on a call still running; the engine turns it into metrics, and sends the next requests for
    the finishing ones' room while their last steps run."""

    rank: int
    running: int
    admitted: int
    finishing: tuple[str, ...] = ()


# Step mode: a request is named finishing while it has this many steps left, and the engine then sends the
# requests that will take its room (engine.running_sets.RunningSetRoom). They reach the worker while its last
# steps run, and those that replace a group that ends together join together, at the iteration after (one
# text-encoder call, and one decode when they end), not one by one as they arrive.
FINISHING_STEPS = 2


def deadline_of(arrival_iteration: int, steps: int) -> int:
    """Step mode: the running-set iteration by which a request that reached its worker at ``arrival_iteration``
    should have had its ``steps``, had it run from then without a pause; past it, the request is late
    (``late_room``). It may have been sent ``FINISHING_STEPS`` iterations before its room frees, and is not late
    for waiting them: late, the requests of one group would split (some late ones paused while the rest run)
    and never join or leave together again."""
    return arrival_iteration + FINISHING_STEPS + steps


def late_room(max_images: int) -> int:
    """Step mode: the images of one denoiser call that requests past their deadline take while requests on time
    wait (workers.runtime.step_batching.RunningSet): half of ``max_batch_size``."""
    return max(1, max_images // 2)


# What a worker's host sends on while a call runs, ahead of the call's reply.
WorkerProgress = PartialImageOutput | StepProgress | RunningSetIteration


@dataclass
class RequestOutput:
    """A worker's answer for one request: uint8 HxWx3 arrays (not PIL objects, which pickle badly), or on the
    serving path (generate_shard(encode=True)) the files the worker encoded them to.

    ``partial_images`` holds the request's partial images, in denoising order, only when the
    worker's host could not send them on while the request ran (see WorkerWrapperBase.progress_sink);
    its StepProgress is then dropped, since it would only arrive once every step is done.
    """

    request_id: str
    images: list[WorkerImage]
    seed: int | tuple[int, ...] | None
    rank: int
    error: str | None = None
    partial_images: list[PartialImageOutput] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    # Seconds of the pipeline call that served it, by stage: text_encode, denoise, vae_decode, and image_encode
    # (its final images' encodes, summed) when the worker encoded them.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # Graphs torch.compile made during that call (set on the call's first request only, so a sum over
    # requests counts each call once); after the start-up warm-up, each one is a recompile.
    compiled_graphs: int = 0


def shard_requests(requests: list[OmniDiffusionRequest], num_shards: int) -> list[list[OmniDiffusionRequest]]:
    """Split one step's requests over the ranks: about equal images each, batchable requests together.

    Requests are ordered by batch key and cut into contiguous runs, so a rank gets at most a few
    groups. Every rank computes the same split from the same list, so a step is one broadcast RPC
    (backend grpc computes it once and sends each rank only its own share, images included).
    """
    by_key: dict[tuple, list[OmniDiffusionRequest]] = defaultdict(list)
    for request in requests:
        by_key[request.batch_key()].append(request)
    total = sum(request.num_images for request in requests)
    shards: list[list[OmniDiffusionRequest]] = [[] for _ in range(num_shards)]
    done = 0
    for group in by_key.values():
        for request in group:
            # The rank whose share of the images holds this request's middle image.
            middle = done + request.num_images / 2
            shards[min(num_shards - 1, int(middle * num_shards / total))].append(request)
            done += request.num_images
    return shards


def image_slices(requests: list[OmniDiffusionRequest]) -> Iterator[tuple[OmniDiffusionRequest, slice]]:
    """Each request of a batch that holds every request's images in order, with the slice that is its own."""
    start = 0
    for request in requests:
        yield request, slice(start, start + request.num_images)
        start += request.num_images


def group_shares(
    requests: list[OmniDiffusionRequest],
    num_groups: int,
    group: int | None = None,
    groups: tuple[int, ...] | None = None,
) -> list[list[OmniDiffusionRequest]]:
    """Each rank group's share of a step: shard_requests's split, or every request for ``group`` when the
    caller chose one (step mode sends each request to the group with the most free room). ``groups``:
    only these groups share the step (the others are out of service) and the rest get nothing."""
    if group is not None:
        if not 0 <= group < num_groups:
            raise ValueError(f"group must be between 0 and {num_groups - 1}, got {group}")
        return [requests if index == group else [] for index in range(num_groups)]
    if groups is None:
        return shard_requests(requests, num_groups)
    if not groups or not all(0 <= index < num_groups for index in groups):
        raise ValueError(f"groups must be rank groups between 0 and {num_groups - 1}, got {groups}")
    shares: list[list[OmniDiffusionRequest]] = [[] for _ in range(num_groups)]
    for index, share in zip(groups, shard_requests(requests, len(groups))):
        shares[index] = share
    return shares


def rank_group_share(
    requests: list[OmniDiffusionRequest],
    od_config: OmniDiffusionConfig,
    rank: int,
    group: int | None = None,
    groups: tuple[int, ...] | None = None,
) -> list[OmniDiffusionRequest]:
    """The requests of a step that ``rank``'s group makes (group_shares): every rank computes the same split."""
    return group_shares(requests, od_config.num_rank_groups, group, groups)[rank // od_config.rank_group_size]
