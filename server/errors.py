"""The one error table: every failure becomes an OpenAI error body with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    GenerationFailedError,
    InvalidRequestError,
    NoRoomError,
    NoServingGroupError,
    NotFoundError,
    RequestTimeoutError,
)
from server.protocol import ErrorDetail, ErrorEvent, ErrorResponse

logger = logging.getLogger(__name__)

# engine error -> (HTTP status, OpenAI error type); the first class that matches wins.
ERROR_TABLE: dict[type[EngineError], tuple[int, str]] = {
    NotFoundError: (404, "invalid_request_error"),
    InvalidRequestError: (400, "invalid_request_error"),
    EngineOverloadedError: (429, "rate_limit_error"),
    NoRoomError: (503, "server_error"),
    GenerationFailedError: (500, "server_error"),
    EngineDeadError: (503, "server_error"),
    RequestTimeoutError: (504, "server_error"),
}

# The error statuses every route may answer, for the OpenAPI schema.
ERROR_RESPONSES: dict = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request (names the param)",
        401: "missing or wrong API key",
        404: "no such model or image file",
        429: "queue full; retry after Retry-After",
        500: "the pipeline failed (x-should-retry: false)",
        503: "no worker can serve, the model failed to load or has no room to load, or the server is draining",
        504: "a worker did not answer in time",
    }.items()
}

# What a 429 tells clients to wait: a step of a small model takes well under this.
RETRY_AFTER_S = 1

# The engine speaks of its own request fields; clients know the OpenAI names.
_PARAM_NAMES = {"num_images": "n", "width": "size", "height": "size"}

# Transient failures (overload, a worker restarting, a timeout): the clients' default retries suit them.
_TRANSIENT_STATUSES = {408, 409, 429, 502, 503, 504}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    response = JSONResponse(body.model_dump(), status_code=status)
    # The official clients retry 5xx three times unless told not to; a bad request or a pipeline
    # failure (e.g. out of memory at this size) would only fail three more times.
    if status not in _TRANSIENT_STATUSES:
        response.headers["x-should-retry"] = "false"
    return response


def _engine_error_detail(error: EngineError) -> tuple[int, ErrorDetail]:
    status, type_ = next((v for cls, v in ERROR_TABLE.items() if isinstance(error, cls)), (500, "server_error"))
    param = getattr(error, "param", None)
    code = getattr(error, "code", None)
    return status, ErrorDetail(message=str(error), type=type_, param=_PARAM_NAMES.get(param, param), code=code)


def engine_error_response(error: EngineError) -> JSONResponse:
    status, detail = _engine_error_detail(error)
    response = error_response(status, detail.message, detail.type, detail.param, detail.code)
    if isinstance(error, (EngineOverloadedError, NoServingGroupError, NoRoomError)):
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def engine_error_event(error: EngineError) -> ErrorEvent:
    """The event that tells a stream's client of ``error`` once the 200 has been sent."""
    return ErrorEvent(error=_engine_error_detail(error)[1])


def _validation_response(error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, "We could not parse the JSON body of your request.", "invalid_request_error")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{'.'.join(location)}'."
    else:
        message = f"Invalid value for '{'.'.join(location)}': {first.get('msg')}."
    param = location[0] if location else None
    return error_response(400, message, "invalid_request_error", param, first.get("type"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_response(error)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, error: EngineError) -> JSONResponse:
        return engine_error_response(error)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, error: HTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if error.status_code < 500 else "server_error"
        response = error_response(error.status_code, str(error.detail), type_)
        response.headers.update(error.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal server error ({type(error).__name__})", "server_error")
