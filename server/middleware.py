"""Pure ASGI middleware (no BaseHTTPMiddleware, which hides client disconnects from routes)."""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import metrics


class RequestMetricsMiddleware:
    """Counts every answered request by route and status; times the image routes end to end."""

    def __init__(self, app: ASGIApp, model_name: str):
        self.app = app
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            metrics.REQUESTS.labels(self.model_name, endpoint, str(status["code"])).inc()
            if endpoint.startswith("/v1/images"):
                metrics.E2E_LATENCY.labels(self.model_name).observe(time.monotonic() - started)


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413, by Content-Length or while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(413, f"The request body is larger than the limit of {self.max_bytes} bytes.")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_error(scope, receive, send, too_large)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, counting_receive, send)


async def _send_error(scope: Scope, receive: Receive, send: Send, error: HTTPException) -> None:
    from server.errors import error_response

    response = error_response(error.status_code, str(error.detail), "invalid_request_error")
    await response(scope, receive, send)
