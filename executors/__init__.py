"""Executors move calls between the engine and its workers. No diffusers here."""

from __future__ import annotations

import importlib

from executors.base import (
    DiffusionExecutor,
    ExecutorError,
    RpcTimeoutError,
    WorkerDiedError,
    WorkerRpcError,
    WorkerStartupError,
)
from executors.external import ExternalDiffusionExecutor
from executors.multiproc import MultiProcDiffusionExecutor

__all__ = [
    "DiffusionExecutor",
    "ExecutorError",
    "ExternalDiffusionExecutor",
    "MultiProcDiffusionExecutor",
    "RpcTimeoutError",
    "WorkerDiedError",
    "WorkerRpcError",
    "WorkerStartupError",
    "get_executor_class",
]

BACKENDS = ("mp", "ray", "ray_external", "grpc", "external_launcher")


def get_executor_class(backend: str | type) -> type[DiffusionExecutor]:
    """Map a backend name, a DiffusionExecutor subclass or a 'package.module:Class' string to a class.

    The Ray backends are imported only here, so Ray stays an optional extra.
    """
    if isinstance(backend, type):
        if issubclass(backend, DiffusionExecutor):
            return backend
        raise ValueError(f"{backend.__qualname__} is not a DiffusionExecutor subclass")
    if backend == "mp":
        return MultiProcDiffusionExecutor
    if backend == "ray":
        from executors.ray import RayDiffusionExecutor

        return RayDiffusionExecutor
    if backend == "ray_external":
        from executors.ray_external import RayExternalDiffusionExecutor

        return RayExternalDiffusionExecutor
    if backend == "grpc":
        from executors.grpc_external import GrpcExternalDiffusionExecutor

        return GrpcExternalDiffusionExecutor
    if backend == "external_launcher":
        # Usable only through a subclass: constructing it says which methods to implement.
        return ExternalDiffusionExecutor
    if isinstance(backend, str) and ":" in backend:
        module_name, _, class_name = backend.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load executor backend {backend!r}: {error}") from error
        return get_executor_class(found)
    raise ValueError(
        f"unknown executor backend {backend!r}; valid: {', '.join(BACKENDS)}, "
        "a DiffusionExecutor subclass, or 'package.module:Class'"
    )
