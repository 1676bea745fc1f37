"""ModelRegistry: the models one server serves, each a DiffusionEngine (and its workers) loaded when asked for
and unloaded when idle or when another model needs its room. See docs/models.md.

Every decision runs on the event loop, between awaits, so the counts it reads cannot change under it; loading
and unloading (starting and stopping workers) run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from engine import metrics
from engine.batcher import AsyncDiffusionEngine
from engine.engine import DiffusionEngine
from engine.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    ModelUnavailableError,
    NoRoomError,
    NotFoundError,
)
from engine.loading import ModelLoader
from engine.residency import FAILED, LOADED, LOADING, UNLOADED, Room, ServedModel
from workers.config import OmniDiffusionConfig
from workers.data import defaults_in_force
from workers.model_settings import is_external

logger = logging.getLogger(__name__)

# OpenMP's settings of how its idle threads wait: one the user set is left as it is.
OPENMP_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


class ModelRegistry:
    """The models a server serves (the first takes requests that name none), each loaded on demand.

    ``use(model)`` holds a model for one request: it loads it (making room first) and answers its
    AsyncDiffusionEngine. Room: at most ``max_loaded_models`` loaded at once, and at most
    ``memory_budget_gib`` on any device (from the figures the workers measured, or before a first load the
    meta-device estimate); the least recently used model without users is unloaded to make it. When no such
    model is left, the request waits up to ``request_timeout_s`` for one, then gets NoRoomError (503) naming
    the models that hold the room. An idle model unloads after its ``model_keep_alive_s``. A model that fails
    to load answers ModelUnavailableError with the cause until a back-off has passed, then loads again.

    A model's engine is a DiffusionEngine (built in a thread); before its first load, the bytes one of its ranks
    will take are workers.runtime.memory.estimate_model_bytes.
    """

    def __init__(self, settings: list[OmniDiffusionConfig], server_config: OmniDiffusionConfig):
        self.models: dict[str, ServedModel] = {}
        for index, config in enumerate(settings):
            preload = config.preload if config.preload is not None else index == 0
            model = ServedModel(config, preload=preload or is_external(config))
            # Until its first load, its card tells what its settings alone decide.
            unloaded_info = {"model_defaults": {}, "native_size": None}
            model.defaults = {name: default.value for name, default in defaults_in_force(config, unloaded_info).items()}
            self.models[config.model_name] = model
        self.first = next(iter(self.models.values()))
        self.server_config = server_config
        self.room = Room(server_config.max_loaded_models, server_config.memory_budget_gib)
        self.draining = False
        # Set once the server stops waiting for loads and room (end_waits): the requests still waiting get 503.
        self.waits_ended = False
        # Called with the reason when a model's engine turns fatal (--on-worker-death exit): the server exits.
        self.fatal_listeners: list[Callable[[str], None]] = []
        # Why a model's engine could not serve any more (kept after the engines are closed).
        self.fatal_error: str | None = None
        self._changed: asyncio.Event | None = None
        self._waits_ended: asyncio.Event | None = None
        self.loader = ModelLoader(changed=lambda: self._changed.set(), on_fatal=self._on_fatal)
        preloaded = [model for model in self.models.values() if model.preload and not model.external]
        if self.room.max_loaded_models is not None and len(preloaded) > self.room.max_loaded_models:
            raise ValueError(
                f"{len(preloaded)} models are preloaded but --max-loaded-models is {self.room.max_loaded_models}"
            )
        for model in self.models.values():
            metrics.MODEL_LOADED.labels(model.name).set(0)
        self._share_cores_politely()

    def _share_cores_politely(self) -> None:
        """With several models that start their own workers, make those workers' idle torch threads sleep rather
        than spin. Each model's ranks have a thread per core they share (docs/models.md): while two models generate
        at once, OpenMP's default spin-wait between parallel regions burns the cores the other model's threads
        need (two models at 64x64 made a tenth of the images per second; passive waiting gave them back). Set in
        this process's environment before any worker starts, which the workers inherit."""
        own_workers = [model for model in self.models.values() if not model.external]
        if len(own_workers) > 1 and not any(name in os.environ for name in OPENMP_WAIT_SETTINGS):
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            logger.info("several models share this host's cores: their workers run with OMP_WAIT_POLICY=PASSIVE")

    @classmethod
    def of_engine(cls, engine: DiffusionEngine) -> ModelRegistry:
        """A registry serving one engine that is already loaded."""
        registry = cls([engine.od_config], engine.od_config)
        registry.loader.adopt(registry.first, engine)
        return registry

    # -- start and stop ---------------------------------------------------------------------------
    def preload(self) -> None:
        """Load every preloaded model, in order, before the server listens (blocking). A model that cannot
        load raises, naming it: a start-up error."""
        for model in self.models.values():
            if model.preload and model.engine is None:
                self.loader.preload(model)

    def start(self) -> None:
        """On the event loop: the batching front of every loaded model, and the keep-alive timers."""
        self._changed = asyncio.Event()
        self._waits_ended = asyncio.Event()
        for model in self.models.values():
            if model.engine is not None:
                self.loader.start_front(model)

    async def close(self) -> None:
        """Stop every model (loads in progress first finish; the requests that waited for them get
        EngineDeadError). Idempotent."""
        self.end_waits()
        for model in self.models.values():
            if model.loading is not None:
                await asyncio.gather(model.loading, return_exceptions=True)
            if model.idle_timer is not None:
                model.idle_timer.cancel()
            if model.engine is not None:
                front, engine = model.front, model.engine
                model.front = model.engine = None
                model.status = UNLOADED
                await self.loader.stop(front, engine)
            if model.closing is not None:
                await asyncio.gather(model.closing, return_exceptions=True)

    def close_engines(self) -> None:
        """Close every engine still open, from outside the event loop (after the server stopped)."""
        for model in self.models.values():
            if model.engine is not None:
                model.engine.close()


    def start_draining(self) -> None:
        """Refuse new requests (503); queued and running ones still finish."""
        self.draining = True
        for model in self.models.values():
            if model.front is not None:
                model.front.start_draining()

    def end_waits(self) -> None:
        """Answer EngineDeadError (503) now to every request still waiting for a model to load or for room, and
        to any that would: once the drain's time has run out, each gets an answer rather than a cut connection."""
        self.waits_ended = True
        if self._waits_ended is not None:
            self._waits_ended.set()
            self._changed.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request holds a model (waiting for its load, queued, running, or its stream still
        being sent) and no model has a step running, at most ``timeout_s``; True if it got there."""
        deadline = time.monotonic() + timeout_s
        while any(model.users for model in self.models.values()):
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
            except TimeoutError:
                return False
        for model in self.models.values():
            if model.front is not None and not await model.front.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # -- requests ---------------------------------------------------------------------------------
    def get(self, name: str | None) -> ServedModel:
        """The model ``name`` names (None: the first); NotFoundError (404 model_not_found) for any other name."""
        if name is None:
            return self.first
        model = self.models.get(name)
        if model is None:
            raise self.not_found(name)
        return model

    def not_found(self, name: str) -> NotFoundError:
        """The 404 of a model id no model or adapter has (each served name listed)."""
        served = ", ".join(f"'{served}'" for served in self.served_names())
        return NotFoundError(
            f"The model '{name}' does not exist; this server serves {served}.", param="model", code="model_not_found"
        )

    def served_names(self) -> list[str]:
        """Every model id a request may send: each model, then its LoRA adapters."""
        return [name for model in self.models.values() for name in [model.name, *self.adapter_names(model)]]

    def adapter_names(self, model: ServedModel) -> list[str]:
        """The LoRA adapters of ``model``: those it serves when loaded, else those it will serve once loaded."""
        return [adapter.name for adapter in model.served_adapters()]

    def adapter_owner(self, name: str) -> ServedModel | None:
        """The model whose LoRA adapter is named ``name`` (see adapter_names)."""
        return next((model for model in self.models.values() if name in self.adapter_names(model)), None)

    def needs_load(self, model: ServedModel) -> bool:
        """Whether a request for ``model`` now would wait for it to load (not when it would be refused at once)."""
        if self.draining or model.refusing:
            return False
        return model.status in (UNLOADED, LOADING) or (model.status == FAILED and time.monotonic() >= model.retry_at)

    def forget_adapter(self, model: ServedModel, name: str) -> None:
        """Drop the LoRA adapter ``name`` of ``model``, which is not loaded: its next load leaves it out."""
        model.adapters = [adapter for adapter in model.served_adapters() if adapter.name != name]

    async def acquire(self, model: ServedModel) -> AsyncDiffusionEngine:
        """Hold ``model`` for one request, loaded (after making room): never unloaded until ``release``."""
        if self.draining:
            raise EngineDeadError("the server is shutting down")
        if model.refusing:
            raise ModelUnavailableError(f"The model '{model.name}' is being unloaded.")
        model.users += 1
        if model.idle_timer is not None:
            model.idle_timer.cancel()
            model.idle_timer = None
        try:
            front = await self._loaded(model)
        except BaseException:
            self.release(model)
            raise
        model.last_used = time.monotonic()
        return front

    def release(self, model: ServedModel) -> None:
        """The request that held ``model`` is done with it."""
        model.users -= 1
        model.last_used = time.monotonic()
        self.loader.arm_keep_alive(model)
        self._changed.set()

    @asynccontextmanager
    async def use(self, model: ServedModel) -> AsyncIterator[AsyncDiffusionEngine]:
        """``acquire`` for the block, ``release`` after it."""
        front = await self.acquire(model)
        try:
            yield front
        finally:
            self.release(model)

    async def load(self, model: ServedModel) -> None:
        """Load ``model`` now (the admin route), making room as a request would."""
        async with self.use(model):
            pass

    async def unload(self, model: ServedModel) -> None:
        """Unload ``model`` (the admin route): refuse its new requests at once, let its queued and running ones
        finish, then stop its workers."""
        if model.external:
            backend = model.config.distributed_executor_backend
            raise InvalidRequestError(
                f"The model '{model.name}' runs on workers this server does not start ({backend}): it cannot be "
                "unloaded here.",
                param="model",
            )
        model.refusing = True
        try:
            while model.users or model.loading is not None:
                self._changed.clear()
                await self._changed.wait()
            if model.status == LOADED:
                self.loader.begin_unload(model, "admin")
            if model.closing is not None:
                await asyncio.gather(model.closing, return_exceptions=True)
        finally:
            model.refusing = False

    # -- residency --------------------------------------------------------------------------------
    async def _loaded(self, model: ServedModel) -> AsyncDiffusionEngine:
        room_deadline: float | None = None
        while True:
            if self.waits_ended:
                raise EngineDeadError("the server is shutting down")
            if model.status == LOADED:
                return model.front
            if model.loading is not None:
                # Never cancels the load (others may wait for it too); end_waits ends the wait.
                ended = asyncio.ensure_future(self._waits_ended.wait())
                try:
                    await asyncio.wait({model.loading, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ended.cancel()
                continue
            if model.status == FAILED and time.monotonic() < model.retry_at:
                wait_s = model.retry_at - time.monotonic()
                retry = f" (a request in {wait_s:.0f}s retries the load)" if wait_s < float("inf") else ""
                raise ModelUnavailableError(f"The model '{model.name}' failed to load: {model.error}{retry}")
            if self.room.memory_budget_bytes is not None and not model.memory_bytes and model.estimated_bytes is None:
                model.estimated_bytes = await asyncio.to_thread(self._estimate_bytes, model)
                continue  # the world may have changed while estimating
            if not self.room.fits(model, []):
                raise NoRoomError(self.room.too_large(model))
            victims, fits = self.room.least_recently_used(model, self._resident(model))
            if not fits:  # what would have to go has users
                timeout_s = self.server_config.request_timeout_s
                room_deadline = room_deadline or time.monotonic() + timeout_s
                remaining = room_deadline - time.monotonic()
                if remaining <= 0:
                    holders = [m.name for m in self._resident(model)]
                    raise NoRoomError(
                        f"No room to load the model '{model.name}' after {timeout_s:g}s: "
                        f"{', '.join(repr(name) for name in holders)} hold it and have requests queued or running."
                    )
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            for victim in victims:
                self.loader.begin_unload(victim, "room")
            model.status = LOADING
            model.loading = asyncio.get_running_loop().create_task(
                self._load(model, [v.closing for v in victims if v.closing is not None])
            )

    def _estimate_bytes(self, model: ServedModel) -> int:
        from workers.runtime.memory import estimate_model_bytes

        try:
            return estimate_model_bytes(model.config) or 0
        except Exception as error:  # noqa: BLE001 - no estimate: the figure measured after loading decides
            logger.warning("no memory estimate for model '%s': %s", model.name, error)
            return 0

    def _resident(self, model: ServedModel) -> list[ServedModel]:
        """The models other than ``model`` that take room now: loaded or loading, external ones aside."""
        return [
            m for m in self.models.values() if m is not model and not m.external and m.status in (LOADED, LOADING)
        ]

    async def _load(self, model: ServedModel, closing: list[asyncio.Task]) -> None:
        try:
            if await self.loader.load(model, closing):
                self._keep_within_budget(model)
        finally:
            model.loading = None
            self._changed.set()

    def _on_fatal(self, reason: str) -> None:
        self.fatal_error = self.fatal_error or reason
        for listener in self.fatal_listeners:
            listener(reason)

    def _keep_within_budget(self, model: ServedModel) -> None:
        """After a load whose estimate fell short: unload idle models until the measured figures fit (the model
        itself, failed, when it does not fit alone)."""
        if not self.room.fits(model, []):
            model.error = self.room.too_large(model)
            self.loader.begin_unload(model, "room")
            model.status = FAILED
            model.retry_at = float("inf")  # its size will not change: no retry
            return
        for victim in self.room.least_recently_used(model, self._resident(model))[0]:
            self.loader.begin_unload(victim, "room")

    # -- probes -----------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Every preloaded model that is loaded serves (one unloaded since, by keep-alive or for room, loads
        again on its next request; one that failed on demand is /health's to list)."""
        return not self.draining and all(
            model.engine.is_ready() for model in self.models.values() if model.preload and model.engine is not None
        )

    def check_health(self) -> list[tuple[ServedModel, EngineError]]:
        """Every loaded model's health (blocking: external workers are asked over the network): the models that
        cannot serve, with why."""
        failing = []
        for model in list(self.models.values()):
            engine = model.engine
            if engine is None:
                continue
            try:
                engine.check_health()
            except EngineError as error:
                failing.append((model, error))
        return failing
