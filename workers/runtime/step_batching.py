"""Step-level continuous batching: a worker's running set of requests that share one denoiser call per
iteration, each request with its own scheduler, so requests join and leave between denoising steps.

A pipeline's ``__call__`` denoises one batch from the first step to the last. Here the loop is ours:
every ``RunningSet.iterate()`` admits the compatible requests that have arrived, calls the UNet or
transformer once over every running request with per-sample timesteps, advances each request's own
scheduler on its slice, and decodes the requests that have had all their steps. A request's initial
noise is drawn from its own generators exactly as request mode draws it, so a seed gives the same
pixels (within the cross-batch tolerance, docs/benchmarks.md) whatever it ran beside.

Each pipeline family's loop (prompt encoding, initial noise, the batched denoiser call) is in
workers/runtime/denoise_loops.py.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from workers.data import (
    FINISHING_STEPS,
    OmniDiffusionRequest,
    PartialImageOutput,
    RequestOutput,
    RunningSetIteration,
    StepProgress,
    WorkerProgress,
    deadline_of,
    image_slices,
    late_room,
)
from workers.logs import describe_error
from workers.runtime.denoise_loops import STEP_LOOPS, RunningRequest
from workers.runtime.stages import Cancellations, StageTimer, count_usage, decode_latents, partial_image_steps, to_uint8

logger = logging.getLogger(__name__)

CANCELLED = "cancelled: the client went away"


class StepWorker(Protocol):
    """What step batching uses of its worker (workers.worker.WorkerWrapperBase): its settings, rank, device,
    loaded pipelines, levers, adapters and rank group, the cancellations it has been told of, and three of
    its public methods."""

    od_config: Any
    rank: int
    device: torch.device | None
    pipeline: Any
    pipelines: dict
    levers: Any
    loras: Any
    rank_group: Any
    cancellations: Cancellations
    progress_sink: Callable[[WorkerProgress], None] | None
    encoder: Any  # workers.runtime.encoding.ImageEncoder

    def fill_in(self, requests: list[OmniDiffusionRequest]) -> list[OmniDiffusionRequest]: ...

    def group_share(
        self, requests: list[OmniDiffusionRequest], group: int | None = None
    ) -> list[OmniDiffusionRequest]: ...

    def generate(self, requests: list[OmniDiffusionRequest], encode: bool = False) -> list[RequestOutput]: ...

    def send_partial(
        self, partial: PartialImageOutput, request: OmniDiffusionRequest, sink: Callable[[WorkerProgress], None],
        encode: bool,
    ) -> None: ...


def step_mode_refusal(worker: StepWorker) -> str | None:
    """Why ``worker`` cannot run step mode (None: it can). The caller logs it and runs request mode."""
    if worker.od_config.compile != "none":
        # The warm-up compiles request mode's calls; a running set's per-sample timesteps and changing
        # batch would recompile at every new batch size.
        return f"--compile {worker.od_config.compile} is warmed up for request mode's calls"
    pipeline = worker.pipeline
    name = type(pipeline).__name__
    if name not in STEP_LOOPS:
        return f"{name} has no step loop (step mode runs {', '.join(STEP_LOOPS)})"
    if worker.rank_group is not None:
        return "rank groups split each denoiser call between ranks, which a running set does not do"
    if worker.levers.cache_method != "none":
        # Cache hooks keep activations of the previous call for the batch it had; a running set
        # changes its batch at every iteration.
        return f"--cache-method {worker.levers.cache_method} keeps state per batch, and a running set's batch changes"
    if getattr(getattr(pipeline, "unet", None), "config", {}).get("time_cond_proj_dim") is not None:
        return "a UNet with a guidance embedding (time_cond_proj_dim) is not supported"
    return None


def request_refusal(request: OmniDiffusionRequest) -> str | None:
    """Why a request cannot join a running set (None: it can); it runs in request mode instead."""
    if request.task != "text2img":
        return f"{request.task} runs in request mode (its pipeline starts from an image)"
    return None


def _fill(chosen: list, candidates: list, max_images: int) -> list:
    """``chosen`` and then ``candidates`` in order while their images fit in ``max_images`` (the first always)."""
    chosen = list(chosen)
    images = sum(request.num_images for request, _ in chosen)
    for candidate in candidates:
        if chosen and images + candidate[0].num_images > max_images:
            break
        chosen.append(candidate)
        images += candidate[0].num_images
    return chosen


class RunningSet:
    """The requests one worker is denoising, advanced together one step per ``iterate()``.

    ``add()`` queues requests (filled in, see workers.data.with_defaults, and admissible:
    ``request_refusal`` is None). Each request has a deadline: the iteration it would finish at had it
    run from its arrival without a pause, its arrival plus its step count, plus the steps it may wait for
    the room it was sent ahead for (workers.data.deadline_of). Each iteration's denoiser
    call takes the earliest deadlines, up to ``max_batch_size`` images, among the requests that share
    the running set's ``step_key``; the others wait, paused with their latents and scheduler. So a
    4-step request that arrives behind 40-step ones goes first, and a 40-step one still runs once its
    deadline is the earliest: no request starves. Requests past their deadline take at most
    ``late_room`` of a call while requests on time wait, so that a set of long requests paused for short
    ones catches up without shutting the next short ones out. A waiting request with another key stops the
    requests behind it from joining until the running set has drained. A request's text is encoded
    when it first joins a call. Cancelled requests (WorkerWrapperBase.cancel) leave at the next iteration.

    It is part of its worker, and reads the worker's cancellations directly.
    """

    def __init__(self, worker: StepWorker):
        if (refusal := step_mode_refusal(worker)) is not None:
            raise ValueError(f"step mode: {refusal}")
        self.worker = worker
        self.pipeline = worker.pipelines["text2img"]
        self.max_images = worker.od_config.max_batch_size
        self.running: list[RunningRequest] = []  # started: in the latest denoiser call, or paused
        self.waiting: deque[OmniDiffusionRequest] = deque()  # not started yet, in arrival order
        self.batch: list[RunningRequest] = []  # the requests of the latest denoiser call (once it ends: those left)
        self.iteration = 0
        self._deadlines: dict[str, int] = {}  # request id -> deadline_of(its arrival iteration, its steps)
        self._encoded: set[str] = set()  # ids of the requests whose images the worker encodes (the serving path)
        self._loop = None  # the family's loop, made for the running set's key
        self._scheduler = None  # a fresh scheduler, made with the loop: each request's own is a copy of it
        self._key: tuple | None = None
        # Requests admitted by the latest iteration (a metric: admissions per iteration).
        self.admitted = 0
        # Ids of the requests of the latest call that have at most FINISHING_STEPS steps left.
        self.finishing: tuple[str, ...] = ()
        self._default_guidance = inspect.signature(type(self.pipeline).__call__).parameters["guidance_scale"].default

    @property
    def size(self) -> int:
        """Requests of the latest denoiser call that are still running (the running-set metric)."""
        return len(self.batch)

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return not self.running and not self.waiting

    def add(self, requests: list[OmniDiffusionRequest], encode: bool = False) -> None:
        """Queue filled-in requests; they join at the next iteration that has room for them. With ``encode``,
        their final and partial images leave as files (see WorkerWrapperBase.generate)."""
        for request in requests:
            if (refusal := request_refusal(request)) is not None:
                raise ValueError(refusal)
        for request in requests:
            self._deadlines[request.request_id] = deadline_of(self.iteration, request.num_inference_steps)
        if encode:
            self._encoded.update(request.request_id for request in requests)
        self.waiting.extend(requests)

    @torch.inference_mode()
    def iterate(self, sink: Callable[[WorkerProgress], None] | None = None) -> list[RequestOutput]:
        """One iteration: drop cancelled requests, admit waiting ones, one denoiser call, each request's
        scheduler step, and decode those that had their last step. Returns the requests that left the
        set (finished, cancelled or failed). ``sink`` gets StepProgress and partial images as they are
        made; without one, partial images go in the request's output."""
        worker = self.worker
        outputs = self._drop_cancelled()
        leaving: list[RunningRequest] = []
        timer = StageTimer(self.pipeline, worker.device)
        with worker.levers.pipeline_call(self.pipeline, False) as call, timer:
            outputs += self._admit()
            if self.batch:
                leaving = self._step(sink)
                self.iteration += 1
        # Each request counts the seconds of every call it was in; the graphs compiled, once.
        for r in self.batch:
            for stage, seconds in timer.seconds.items():
                r.stage_seconds[stage] += seconds
        if self.batch:
            self.batch[0].compiled_graphs += call["compiled_graphs"]
        self.batch = [r for r in self.batch if all(r is not other for other in leaving)]
        self.finishing = tuple(r.request.request_id for r in self.batch if r.total_steps - r.step <= FINISHING_STEPS)
        outputs += [self._output(r) for r in leaving]
        for output in outputs:
            self._deadlines.pop(output.request_id, None)
            self._encoded.discard(output.request_id)
        if not self.running:
            self._key = self._loop = self._scheduler = None
            self.pipeline.maybe_free_model_hooks()  # offload hooks re-armed, as at the end of a pipeline call
        return outputs

    def _drop_cancelled(self) -> list[RequestOutput]:
        ids = [r.request.request_id for r in self.running] + [r.request_id for r in self.waiting]
        cancelled = self.worker.cancellations.take(ids)
        if not cancelled:
            return []
        left = [r.request for r in self.running if r.request.request_id in cancelled]
        left += [r for r in self.waiting if r.request_id in cancelled]
        self.running = [r for r in self.running if r.request.request_id not in cancelled]
        self.waiting = deque(r for r in self.waiting if r.request_id not in cancelled)
        for r in left:
            self.worker.encoder.forget(r.request_id)
        return [RequestOutput(r.request_id, [], r.seed, self.worker.rank, CANCELLED) for r in left]

    def _admit(self) -> list[RequestOutput]:
        """Choose this iteration's batch (earliest deadlines first, see the class docstring) and start its
        requests that had not started; returns those that failed to start."""
        if not self.running and self.waiting:  # the oldest waiting request sets what the running set runs
            first = self.waiting[0]
            guidance = first.guidance_scale if first.guidance_scale is not None else self._default_guidance
            self._key = first.step_key()
            self._loop = STEP_LOOPS[type(self.pipeline).__name__](self.pipeline, guidance)
            # A copy costs a quarter of from_config's parsing of the config, once per request.
            self._scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        joinable = list(itertools.takewhile(lambda request: request.step_key() == self._key, self.waiting))
        candidates = sorted(
            [(r.request, r) for r in self.running] + [(request, None) for request in joinable],
            key=lambda candidate: self._deadlines[candidate[0].request_id],  # sorted() is stable: ties by arrival
        )
        late = [c for c in candidates if self._deadlines[c[0].request_id] <= self.iteration]
        on_time = [c for c in candidates if self._deadlines[c[0].request_id] > self.iteration]
        # Late requests take at most late_room of the call while others wait, then whatever room is left.
        first_late = _fill([], late, late_room(self.max_images))
        chosen = _fill(first_late, on_time, self.max_images)
        chosen = _fill(chosen, late[len(first_late):], self.max_images)
        starting = [request for request, started in chosen if started is None]
        ids = {request.request_id for request in starting}
        self.waiting = deque(request for request in self.waiting if request.request_id not in ids)
        started, failed = self._start(starting)
        self.running += started
        self.admitted = len(started)
        of = {r.request.request_id: r for r in self.running}
        self.batch = [of[request.request_id] for request, _ in chosen if request.request_id in of]
        return failed

    def _start(self, requests: list[OmniDiffusionRequest]) -> tuple[list[RunningRequest], list[RequestOutput]]:
        """Start requests together (one text-encoder call); if that fails, one by one, so that only a bad
        request fails. Returns those started and the outputs of those that failed."""
        if not requests:
            return [], []
        first = requests[0]  # they share the step key, adapters included
        try:
            # Adapters change the text encoder too: in effect before the prompts are encoded.
            self.worker.loras.activate(first.loras)
            schedulers = [copy.deepcopy(self._scheduler) for _ in requests]
            generators = [[torch.Generator().manual_seed(seed) for seed in r.image_seeds()] for r in requests]
            return self._loop.start(requests, schedulers, generators), []
        except Exception as error:  # noqa: BLE001 - reported for the request that caused it
            if len(requests) == 1:
                logger.exception("rank %d: request %s failed to start", self.worker.rank, first.request_id)
                return [], [RequestOutput(first.request_id, [], first.seed, self.worker.rank, describe_error(error))]
        started, failed = [], []
        for request in requests:
            one, bad = self._start([request])
            started += one
            failed += bad
        return started, failed

    def _step(self, sink: Callable[[WorkerProgress], None] | None) -> list[RunningRequest]:
        """One denoiser call over the batch and each request's scheduler step on its slice; returns the
        requests that leave (decoded, or failed), removed from the running set."""
        batch = self.batch
        first = batch[0].request
        try:
            self.worker.loras.activate(first.loras)
            prediction = self._loop.predict(batch)
        except Exception as error:  # noqa: BLE001 - the call was shared: every request in it failed
            logger.exception("rank %d: a step over %d requests failed", self.worker.rank, len(batch))
            for r in batch:
                r.error = describe_error(error)
            self.running = [r for r in self.running if all(r is not other for other in batch)]
            return batch
        for r, (_, own) in zip(batch, image_slices([r.request for r in batch]), strict=True):
            r.latents = r.scheduler.step(
                prediction[own], r.timestep, r.latents, **r.extra_step_kwargs, return_dict=False
            )[0]
            r.step += 1
            self._report(r, sink)
        leaving = [r for r in batch if r.finished]
        self.running = [r for r in self.running if not r.finished]
        if leaving:  # one VAE call for all that finished now (they share the size)
            latents = torch.cat([r.latents for r in leaving])
            images = to_uint8(decode_latents(self.pipeline, latents, first.height, first.width))
            for r, (_, own) in zip(leaving, image_slices([r.request for r in leaving]), strict=True):
                r.images = list(images[own])
                if r.request.request_id in self._encoded:  # on the encode pool, while the next iteration runs
                    r.images = self.worker.encoder.encode(r.request, r.images)
        return leaving

    def _report(self, r: RunningRequest, sink: Callable[[WorkerProgress], None] | None) -> None:
        """Its StepProgress (to ``sink`` only) and, at its own steps, its partial images, decoded alone."""
        request = r.request
        if request.progress and sink is not None:
            sink(StepProgress(request.request_id, r.step, r.total_steps))
        if request.partial_images and not r.finished:
            steps = partial_image_steps(request.partial_images, r.total_steps)
            if r.step in steps:
                pixels = to_uint8(decode_latents(self.pipeline, r.latents, request.height, request.width))
                partial = PartialImageOutput(request.request_id, steps.index(r.step), list(pixels))
                if sink is None:
                    r.partial_images.append(partial)
                else:
                    self.worker.send_partial(partial, request, sink, request.request_id in self._encoded)

    def _output(self, r: RunningRequest) -> RequestOutput:
        request, rank = r.request, self.worker.rank
        if r.error is not None:
            self.worker.encoder.forget(request.request_id)
            return RequestOutput(request.request_id, [], request.seed, rank, r.error)
        return RequestOutput(
            request.request_id,
            r.images,
            request.seed,
            rank,
            partial_images=r.partial_images,
            usage=count_usage(self.pipeline, request),
            stage_seconds=r.stage_seconds,
            compiled_graphs=r.compiled_graphs,
        )


@dataclass
class _PendingCall:
    """A generate call whose requests are running: answered once every one of them has left."""

    request_ids: list[str]
    outputs: dict[str, RequestOutput] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        return len(self.outputs) == len(self.request_ids)

    def reply(self) -> list[RequestOutput]:
        return [self.outputs[request_id] for request_id in self.request_ids]


class StepLoop:
    """A RunningSet for a host that receives calls one at a time (workers.hosts.streaming.PipelineThread): the
    requests of each ``generate`` / ``generate_shard`` call join the running set, and the call is answered,
    with the same reply request mode gives, once all of them have left it. Requests that cannot join
    (edits) run at once in request mode, the loop waiting for them."""

    def __init__(self, worker: StepWorker):
        self.worker = worker
        self.running = RunningSet(worker)
        self._calls: dict[Any, _PendingCall] = {}
        self._call_of: dict[str, Any] = {}  # request id -> the call it came in

    @property
    def idle(self) -> bool:
        """No call waits for an answer."""
        return not self._calls

    def submit(self, call_id: Any, method: str, requests: list[OmniDiffusionRequest],
               send: Callable[[Any, WorkerProgress], None], group: int | None = None,
               groups: tuple[int, ...] | None = None, encode: bool = False) -> None:
        """Take a ``method`` call's requests (``group``, ``groups`` and ``encode`` as generate_shard takes them);
        ``send(call_id, progress)`` streams the progress of the requests that run in request mode now. With
        ``encode`` the reply's images are the encodes' Futures, which the host waits for
        (workers.runtime.encoding.when_encoded)."""
        worker = self.worker
        if method == "generate_shard":
            requests = worker.group_share(requests, group, groups)
        requests = worker.fill_in(requests)
        call = _PendingCall([request.request_id for request in requests])
        apart, joining = [], []
        for request in requests:
            (joining if request_refusal(request) is None else apart).append(request)
        if apart:
            worker.progress_sink = lambda progress: send(call_id, progress)
            try:
                call.outputs.update((output.request_id, output) for output in worker.generate(apart, encode))
            finally:
                worker.progress_sink = None
        self.running.add(joining, encode)
        # Only now: a call that raised above is answered by its host, never by iterate().
        self._calls[call_id] = call
        self._call_of.update((request.request_id, call_id) for request in joining)

    def iterate(
        self, send: Callable[[Any, WorkerProgress], None]
    ) -> list[tuple[Any, list[RequestOutput]]]:
        """One iteration of the running set (when it has anything), its RunningSetIteration sent on; returns
        the calls answered now, with their replies."""
        if not self.running.idle:
            sink = lambda progress: send(self._call_of[progress.request_id], progress)  # noqa: E731
            for output in self.running.iterate(sink):
                self._calls[self._call_of.pop(output.request_id)].outputs[output.request_id] = output
            # On a call not yet answered: the host sends its reply after it.
            running = self.running
            iteration = RunningSetIteration(self.worker.rank, running.size, running.admitted, running.finishing)
            send(next(iter(self._calls)), iteration)
        answered = [(call_id, call.reply()) for call_id, call in self._calls.items() if call.answered]
        for call_id, _ in answered:
            del self._calls[call_id]
        return answered

    def abandon(self) -> list[Any]:
        """After a failure of the running set itself: start afresh; returns the calls left unanswered."""
        calls = list(self._calls)
        self.running = RunningSet(self.worker)
        self._calls.clear()
        self._call_of.clear()
        return calls
