"""Pure ASGI middleware (no BaseHTTPMiddleware, which hides client disconnects from routes)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import metrics

request_logger = logging.getLogger("imagegen.requests")
# nginx's status for a request whose client hung up before the answer: nothing is sent, it is only logged and counted.
CLIENT_CLOSED_REQUEST = 499
# A client's X-Request-ID is kept when it is a plain token; anything else gets a fresh id.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready; its request was cancelled and nobody is left to answer."""


class RequestLogMiddleware:
    """Gives each request an id (the client's X-Request-ID, or a new one, echoed in the response),
    counts it by route and status, times the image routes, and logs one line for it. A route's
    ``state.response_headers`` go on whatever answer it gives, an error's too (the image routes'
    x-ratelimit-* headers). The image routes name the model the request ran on (``state.model_name``);
    the others count for ``model_name``, the first model. A request whose client hung up first
    (ClientDisconnected) is logged with status 499 and gets no answer."""

    def __init__(self, app: ASGIApp, model_name: str):
        self.app = app
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", request_id.encode()))
                for name, value in scope["state"].get("response_headers", {}).items():
                    headers.append((name.encode(), value.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except ClientDisconnected:
            status["code"] = CLIENT_CLOSED_REQUEST
        finally:
            elapsed = time.monotonic() - started
            route = scope.get("route")
            endpoint = route.path if route is not None else "unmatched"
            model_name = scope["state"].get("model_name", self.model_name)
            metrics.REQUESTS.labels(model_name, endpoint, str(status["code"])).inc()
            if endpoint.startswith("/v1/images"):
                metrics.E2E_LATENCY.labels(model_name).observe(elapsed)
            # The image routes add what the generation took (images, queue and inference time).
            fields = {
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "model": model_name,
                "status": status["code"],
                "duration_s": round(elapsed, 4),
                **scope["state"].get("generation", {}),
            }
            request_logger.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra=fields)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class BodySizeLimitMiddleware:
    """Refuses bodies over ``max_bytes`` with 413, by Content-Length or while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(
            413,
            f"The request body is larger than the limit of {self.max_bytes} bytes (--max-request-body-bytes); "
            "every image and mask of an edit counts toward it.",
        )
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


_NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


class KeyRing:
    """Bearer keys, checked in constant time: every key is compared (as a SHA-256 digest, so the time
    says nothing of a key's length either), without stopping at a match."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def accepts(self, token: bytes) -> bool:
        digest = hashlib.sha256(token).digest()
        matches = [hmac.compare_digest(digest, key) for key in self._digests]
        return any(matches)

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> tuple[str, str | None] | None:
        """None when ``headers`` carry ``Authorization: Bearer <a key of the ring>``; else the 401's
        message and code."""
        token = bearer_token(headers)
        if not token:
            return _NO_KEY_MESSAGE, None
        if not self.accepts(token):
            return "Incorrect API key provided.", "invalid_api_key"
        return None


def bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The token of ``Authorization: Bearer <token>``; empty when there is none."""
    authorization = next((value for name, value in headers if name == b"authorization"), b"")
    scheme, _, token = authorization.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def key_digest(secret: bytes) -> str:
    """A short SHA-256 digest that tells keys apart in the fair queue without holding the key itself."""
    return hashlib.sha256(secret).hexdigest()[:16]


class ApiKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` with one of ``api_keys`` on /v1/* (and on /metrics
    when ``protect_metrics``); anything else is answered 401 with an OpenAI error body.

    /health and /ready stay open for probes, and the routes ``has_own_key(method, path)`` names check a key
    of their own (the LoRA and model admin routes). Stored images (/v1/images/files/) stay open too: like
    OpenAI's signed URLs, their unguessable URL is the credential, so a browser can show them. So
    do the pages for people (the playground at / and its /static/ files, /docs, /redoc,
    /openapi.json): a browser loads them without a key, and the playground's API calls send one.
    """

    def __init__(
        self, app: ASGIApp, api_keys: list[str], protect_metrics: bool, has_own_key: Callable[[str, str], bool]
    ):
        self.app = app
        self._keys = KeyRing(api_keys)
        self._protect_metrics = protect_metrics
        self._has_own_key = has_own_key

    def _protected(self, method: str, path: str) -> bool:
        if path.startswith("/v1/images/files/") or self._has_own_key(method, path):
            return False
        return path.startswith("/v1/") or (self._protect_metrics and path == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._protected(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        refusal = self._keys.refusal(scope["headers"])
        if refusal is None:
            # Whom the request counts for in the fair queue (server/serving.py): the key, as a digest.
            scope.setdefault("state", {})["api_key_digest"] = key_digest(bearer_token(scope["headers"]))
            await self.app(scope, receive, send)
            return
        await unauthorized(*refusal)(scope, receive, send)


def unauthorized(message: str, code: str | None):
    """The 401 a missing or wrong key gets."""
    from server.errors import error_response

    response = error_response(401, message, "invalid_request_error", code=code)
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _send_error(scope: Scope, receive: Receive, send: Send, error: HTTPException) -> None:
    from server.errors import error_response

    response = error_response(error.status_code, str(error.detail), "invalid_request_error")
    await response(scope, receive, send)
