"""What can go wrong with a request, independent of HTTP. server/errors.py maps each to a status."""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequestError(EngineError):
    """The request cannot be served as asked; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class EngineOverloadedError(EngineError):
    """The queue is full; the client should retry later."""


class RequestTimeoutError(EngineError):
    """The request ran past its deadline (a worker did not answer in time)."""


class EngineDeadError(EngineError):
    """No worker can serve requests (died, or the engine is closed)."""


class NoServingGroupError(EngineDeadError):
    """Every rank group is set aside after a failure; the health probes go on and re-admit a group that
    answers again, so a client may retry (503 with Retry-After)."""


class NoRoomError(EngineError):
    """A model cannot load: the models that hold the room are busy (--max-loaded-models, --memory-budget-gib).
    The server is at capacity, not slow: 503 with Retry-After."""


class ModelUnavailableError(EngineDeadError):
    """The model failed to load (its requests get the cause, 503), or it is being unloaded."""


class GenerationFailedError(EngineError):
    """The pipeline raised for this request."""


class NotFoundError(InvalidRequestError):
    """What the request names (a model, a stored image) does not exist or has expired."""


def from_executor_error(error: Exception) -> EngineError:
    """The engine's error for an executor's: a worker that did not answer in time (504), one that is
    gone (503), or one that answered with an error (500)."""
    from executors import RpcTimeoutError, WorkerDiedError

    if isinstance(error, RpcTimeoutError):
        return RequestTimeoutError(str(error))
    if isinstance(error, WorkerDiedError):
        return EngineDeadError(str(error))
    return GenerationFailedError(str(error))
