"""The HTTP routes, one APIRouter per family; server/app.py includes them all.

images (generations, edits, variations), files (images answered as urls), models, probes
(health, readiness, metrics), playground (the page at /, and /docs, /redoc). A new family is a
module here with a ``router``, included in ``create_app``. What routes share lives on
``app.state`` and is read with the functions below.
"""

from __future__ import annotations

from fastapi import Request

from engine import AsyncDiffusionEngine
from server.serving import ImageServing


def serving(request: Request) -> ImageServing:
    """The shared image request path (set up when the app starts)."""
    return request.app.state.serving


def front(request: Request) -> AsyncDiffusionEngine:
    """The batching front of the engine (set up when the app starts)."""
    return request.app.state.engine
