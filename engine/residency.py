"""One served model's residency (ServedModel: loaded or not, what it took, who holds it) and the room
decisions (Room: which models fit together under --max-loaded-models and --memory-budget-gib, and which idle
ones to unload to make room). The ModelRegistry (engine/models.py) acts on them; see docs/models.md."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from engine.batcher import AsyncDiffusionEngine
from engine.engine import DiffusionEngine
from workers.config import LoraModule, OmniDiffusionConfig
from workers.model_settings import is_external

LOADED, LOADING, UNLOADED, FAILED = "loaded", "loading", "unloaded", "failed"
GIB = 1024**3


@dataclass(eq=False)
class ServedModel:
    """One configured model: its settings, whether it is loaded, what it took when it last was, and who uses it.

    ``users`` counts the requests that hold it (waiting for it to load, queued or running): a model with users
    is never unloaded to make room. ``memory_bytes`` and ``model_info`` are from its last load (kept while it
    is unloaded: the room it needs next time, and its card). ``adapters`` are the LoRA adapters it served when
    it was last unloaded (None before: its start-up ones), loaded again with it.
    """

    config: OmniDiffusionConfig
    preload: bool
    status: str = UNLOADED
    error: str | None = None
    engine: DiffusionEngine | None = None
    front: AsyncDiffusionEngine | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    # Bytes one rank will take, from its modules built on the meta device (before its first load; None: unknown).
    estimated_bytes: int | None = None
    adapters: list[LoraModule] | None = None
    users: int = 0
    last_used: float = 0.0
    loading: asyncio.Task | None = None
    closing: asyncio.Task | None = None
    refusing: bool = False  # an admin unload waits for its requests: new ones are refused
    failures: int = 0
    retry_at: float = 0.0
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.config.model_name

    @property
    def external(self) -> bool:
        """Its workers are someone else's (grpc, ray_external): resident while they are up; never unloaded here."""
        return is_external(self.config)

    @property
    def keep_alive_s(self) -> float:
        return self.config.model_keep_alive_s

    def served_adapters(self) -> list[LoraModule]:
        """The LoRA adapters it serves when loaded; unloaded, those it will serve once loaded again."""
        if self.engine is not None:
            return self.engine.loras.served()
        return list(self.config.lora_adapters if self.adapters is None else self.adapters)

    def footprint(self) -> dict[str, int]:
        """The bytes it takes (or will) per device: measured at its last load, else the estimate on the device
        key "*" (any device: before a load, which device a rank gets is the worker's to find out)."""
        if self.memory_bytes:
            return self.memory_bytes
        return {"*": (self.estimated_bytes or 0) * self.config.num_gpus}


class Room:
    """Which models may be loaded together: at most ``max_loaded_models`` (None: any number), and at most
    ``memory_budget_bytes`` on any device (None: no budget), from each model's ``footprint``."""

    def __init__(self, max_loaded_models: int | None, memory_budget_gib: float | None):
        self.max_loaded_models = max_loaded_models
        self.memory_budget_bytes = int(memory_budget_gib * GIB) if memory_budget_gib is not None else None

    def fits(self, model: ServedModel, kept: list[ServedModel]) -> bool:
        """Whether ``model`` fits beside the models ``kept``."""
        if self.max_loaded_models is not None and len(kept) + 1 > self.max_loaded_models:
            return False
        if self.memory_budget_bytes is None:
            return True
        used: dict[str, int] = {}
        for other in kept:
            for device, size in other.footprint().items():
                used[device] = used.get(device, 0) + size
        need = model.footprint()
        # A figure on "*" (an estimate) may land on any device: it is counted on each.
        devices = (set(used) | set(need)) - {"*"} or {"*"}
        return all(
            used.get(device, 0) + used.get("*", 0) + need.get(device, 0) + need.get("*", 0) <= self.memory_budget_bytes
            for device in devices
        )

    def least_recently_used(self, model: ServedModel, resident: list[ServedModel]) -> tuple[list[ServedModel], bool]:
        """The idle models among ``resident`` to unload, least recently used first, until ``model`` fits; and
        whether it then does. A model unloaded early whose room the later ones freed stays (the most recently
        used first): the budget keeps as many models as it allows."""
        kept = list(resident)
        idle = sorted((m for m in kept if m.status == LOADED and m.users == 0), key=lambda m: m.last_used)
        victims: list[ServedModel] = []
        while not (fits := self.fits(model, kept)) and idle:
            victims.append(idle.pop(0))
            kept.remove(victims[-1])
        if fits:
            for victim in sorted(victims, key=lambda m: m.last_used, reverse=True):
                if self.fits(model, [*kept, victim]):
                    kept.append(victim)
                    victims.remove(victim)
        return victims, fits

    def too_large(self, model: ServedModel) -> str:
        """Why ``model`` cannot load even alone."""
        sizes = ", ".join(f"{device} {size / GIB:.2f} GiB" for device, size in model.footprint().items())
        return (
            f"The model '{model.name}' takes more than --memory-budget-gib {self.memory_budget_bytes / GIB:g} "
            f"allows on its own ({sizes})."
        )
