"""LoraRegistry: the LoRA adapters an engine serves, loaded on every rank alike."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from engine.errors import InvalidRequestError, NotFoundError, from_executor_error
from executors import DiffusionExecutor, ExecutorError
from workers.config import LoraModule, check_lora_name

logger = logging.getLogger(__name__)

# The worker methods (workers.worker.WorkerWrapperBase) that load and unload an adapter on one rank.
LOAD_METHOD, UNLOAD_METHOD = "load_lora_adapter", "unload_lora_adapter"


class LoraRegistry:
    """Which adapters every rank holds, by name (the model id a request picks one with).

    Each load and unload goes to every serving rank through ``call_ranks(method, args)`` (the engine's:
    a rank that fails is set aside or restarted), and each loaded adapter is kept in the executor's
    ``rank_setup_calls``, so a rank that starts again (restarted, replaced, reconnected, re-admitted)
    loads the same adapters before it serves. Paths are resolved and confined on the
    workers' host (workers/runtime/lora.py), where the weights are. An adapter being unloaded is refused at
    once (``get`` raises NotFoundError); the AsyncDiffusionEngine lets its running requests finish first.
    """

    def __init__(self, executor: DiffusionExecutor, base_model_name: str, call_ranks: Callable[[str, tuple], Any]):
        self._executor = executor
        self._call_ranks = call_ranks
        self._base_model_name = base_model_name
        self._adapters: dict[str, LoraModule] = {}
        self._unloading: set[str] = set()
        self._lock = threading.Lock()  # loads and unloads one at a time

    def get(self, name: str, param: str = "model", unloading: bool = False) -> LoraModule:
        """The adapter served as ``name`` (``unloading``: or being unloaded, as it is for the requests admitted
        before); NotFoundError (404 model_not_found, naming ``param``) for any other name: one sent as ``model``
        may be the base model's, one sent in ``loras`` is an adapter's."""
        adapter = self._adapters.get(name)
        if adapter is None or (name in self._unloading and not unloading):
            served = ", ".join(f"'{adapter.name}'" for adapter in self.served())
            if param == "model":
                message = f"The model '{name}' does not exist; this server serves '{self._base_model_name}'" + (
                    f", {served}." if served else "."
                )
            else:
                message = f"The LoRA adapter '{name}' does not exist; this server serves " + (
                    f"the adapters {served}." if served else "no LoRA adapters."
                )
            raise NotFoundError(message, param=param, code="model_not_found")
        return adapter

    def served(self) -> list[LoraModule]:
        """The adapters requests may pick now, in load order."""
        return [adapter for name, adapter in list(self._adapters.items()) if name not in self._unloading]

    def load(self, adapter: LoraModule) -> dict:
        """Load ``adapter`` on every rank; rank 0's report. InvalidRequestError (param ``lora_name`` or
        ``lora_path``) when the name is taken or a rank refuses the path; then no rank keeps it."""
        with self._lock:
            try:
                check_lora_name(adapter.name)
            except ValueError as error:
                raise InvalidRequestError(str(error), param="lora_name") from None
            if adapter.name == self._base_model_name or adapter.name in self._adapters:
                raise InvalidRequestError(
                    f"The model '{adapter.name}' is already served; unload it first, or pick another name",
                    param="lora_name",
                )
            call = (LOAD_METHOD, (adapter.name, adapter.path, adapter.scale))
            replies: list[dict] = self._call(*call)
            refused = [reply["error"] for reply in replies if reply.get("error")]
            if refused:
                self._call(UNLOAD_METHOD, (adapter.name,))  # from the ranks that took it
                raise InvalidRequestError(refused[0], param="lora_path")
            self._adapters[adapter.name] = adapter
            self._executor.rank_setup_calls.append(call)
            return replies[0]

    def restore(self, adapters: list[LoraModule]) -> dict[str, str]:
        """Serve exactly ``adapters`` (what a model served when it was unloaded, for its next load): unload
        the others, load the missing ones. Answers the adapters that would not load again (their files gone),
        with why; the rest serve."""
        wanted = {adapter.name for adapter in adapters}
        for adapter in self.served():
            if adapter.name not in wanted:  # a start-up adapter unloaded at run time stays unloaded
                self.begin_unload(adapter.name)
                self.unload(adapter.name)
        served = {adapter.name for adapter in self.served()}
        refused = {}
        for adapter in adapters:
            if adapter.name not in served:
                try:
                    self.load(adapter)
                except InvalidRequestError as error:
                    refused[adapter.name] = str(error)
        return refused

    def begin_unload(self, name: str) -> LoraModule:
        """Refuse new requests for adapter ``name`` from now on (NotFoundError when it is not served)."""
        adapter = self.get(name)
        self._unloading.add(name)
        return adapter

    def unload(self, name: str) -> None:
        """Remove adapter ``name`` from every rank (``begin_unload`` first; nothing may still run with it)."""
        with self._lock:
            self._executor.rank_setup_calls[:] = [
                call for call in self._executor.rank_setup_calls if call[0] != LOAD_METHOD or call[1][0] != name
            ]
            self._adapters.pop(name, None)
            try:
                self._call(UNLOAD_METHOD, (name,))
            finally:
                self._unloading.discard(name)
            logger.info("unloaded LoRA adapter %s from every rank", name)

    def _call(self, method: str, args: tuple) -> Any:
        try:
            return self._call_ranks(method, args)
        except ExecutorError as error:
            raise from_executor_error(error) from error
