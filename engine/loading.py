"""ModelLoader: starting and stopping the engines of a server's models. A load builds a model's DiffusionEngine
(and its workers) in a thread, with the LoRA adapters it served before; a failed load is retried after a
back-off; an unload takes the model out of service at once and stops its workers in the background; an idle
model unloads after its keep-alive. What to load and what to unload for room is the ModelRegistry's to decide
(engine/models.py); see docs/models.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from engine import metrics
from engine.batcher import AsyncDiffusionEngine
from engine.engine import DiffusionEngine
from engine.residency import FAILED, LOADED, UNLOADED, ServedModel

logger = logging.getLogger(__name__)

# After a failed load, the next request retries it once this back-off has passed (doubling, at most the last).
LOAD_RETRY_BACKOFF_S = (5.0, 10.0, 30.0, 60.0)


class ModelLoader:
    """Loads and unloads models for one ModelRegistry. ``changed`` is called whenever a load or an unload has
    ended (the registry's waiters look again); ``on_fatal`` with the reason when a loaded engine turns fatal."""

    def __init__(self, changed: Callable[[], None], on_fatal: Callable[[str], None]):
        self.changed = changed
        self.on_fatal = on_fatal

    def preload(self, model: ServedModel) -> None:
        """Load ``model`` before the server listens (blocking); a start-up error, naming it, if it cannot."""
        started = time.monotonic()
        try:
            engine = DiffusionEngine(model.config)
        except Exception as error:
            raise RuntimeError(f"could not start model '{model.config.model}': {error}") from error
        self.adopt(model, engine)
        metrics.MODEL_LOAD_TIME.labels(model.name).observe(time.monotonic() - started)

    async def load(self, model: ServedModel, closing: list[asyncio.Task]) -> bool:
        """Load ``model`` once the unloads in ``closing`` have ended; whether it loaded (else it is FAILED, with
        the cause and the time of its retry)."""
        try:
            # The room must really be back before the next load starts: the unloaded models' workers have exited.
            await asyncio.gather(*closing, return_exceptions=True)
            started = time.monotonic()
            logger.info("loading model '%s'", model.name)
            engine = await asyncio.to_thread(self._start_engine, model)
        except Exception as error:  # noqa: BLE001 - the model's requests get the cause; the others serve on
            model.status = FAILED
            model.error = str(error) or type(error).__name__
            model.failures += 1
            backoff = LOAD_RETRY_BACKOFF_S[min(model.failures, len(LOAD_RETRY_BACKOFF_S)) - 1]
            model.retry_at = time.monotonic() + backoff
            logger.error("model '%s' failed to load (retried after %gs): %s", model.name, backoff, model.error)
            return False
        metrics.MODEL_LOAD_TIME.labels(model.name).observe(time.monotonic() - started)
        self.adopt(model, engine)
        self.start_front(model)
        logger.info("model '%s' loaded in %.1fs: %s", model.name, time.monotonic() - started, model.memory_bytes)
        return True

    @staticmethod
    def _start_engine(model: ServedModel) -> DiffusionEngine:
        """``model``'s engine (blocking), serving the LoRA adapters it served when it was last unloaded: its
        start-up ones as before, those loaded at run time loaded again. An adapter that no longer loads (its
        file gone) is left out, with an error logged: the model serves without it."""
        engine = DiffusionEngine(model.config)
        if model.adapters is None:
            return engine
        try:
            refused = engine.loras.restore(model.adapters)
        except BaseException:
            engine.close()
            raise
        for name, why in refused.items():
            logger.error("model '%s' loaded again without its LoRA adapter '%s': %s", model.name, name, why)
        return engine

    def adopt(self, model: ServedModel, engine: DiffusionEngine) -> None:
        """Serve ``engine``, loaded already, as ``model``."""
        model.engine = engine
        model.status = LOADED
        model.error = None
        model.failures = 0
        model.model_info = engine.model_info
        model.defaults = {name: default.value for name, default in engine.defaults.items()}
        model.memory_bytes = dict(engine.model_info.get("memory_bytes") or {})
        model.last_used = time.monotonic()
        engine.fatal_listeners.append(self.on_fatal)
        metrics.MODEL_LOADED.labels(model.name).set(1)
        for device, size in model.memory_bytes.items():
            metrics.MODEL_MEMORY_BYTES.labels(model.name, device).set(size)

    def start_front(self, model: ServedModel) -> None:
        """On the event loop: the batching front of ``model``, loaded, and its keep-alive timer."""
        model.front = AsyncDiffusionEngine(model.engine)
        model.front.start()
        self.arm_keep_alive(model)

    def begin_unload(self, model: ServedModel, reason: str) -> None:
        """Take ``model`` out of service now; its workers stop in the background (``model.closing``)."""
        front, engine = model.front, model.engine
        model.adapters = engine.loras.served()  # loaded again with it
        model.front = model.engine = None
        model.status = UNLOADED
        if model.idle_timer is not None:
            model.idle_timer.cancel()
            model.idle_timer = None
        metrics.MODEL_LOADED.labels(model.name).set(0)
        for device in model.memory_bytes:
            metrics.MODEL_MEMORY_BYTES.labels(model.name, device).set(0)
        metrics.MODEL_UNLOADS.labels(model.name, reason).inc()
        logger.info("unloading model '%s' (%s)", model.name, reason)
        model.closing = asyncio.get_running_loop().create_task(self.stop(front, engine))

    async def stop(self, front: AsyncDiffusionEngine | None, engine: DiffusionEngine) -> None:
        """Stop a model's front and engine; returns once its workers have exited."""
        if front is not None:
            await front.close()
        await asyncio.to_thread(engine.close)
        self.changed()

    def arm_keep_alive(self, model: ServedModel) -> None:
        """On the event loop: (re)start ``model``'s idle timer, when it is loaded, unused and has a keep-alive."""
        if model.keep_alive_s < 0 or model.users or model.status != LOADED or model.external:
            return
        if model.idle_timer is not None:
            model.idle_timer.cancel()
        model.idle_timer = asyncio.get_running_loop().call_later(model.keep_alive_s, self._unload_if_idle, model)

    def _unload_if_idle(self, model: ServedModel) -> None:
        model.idle_timer = None
        if model.status == LOADED and not model.users and not model.refusing:
            self.begin_unload(model, "idle")
