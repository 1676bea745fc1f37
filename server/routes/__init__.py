"""The HTTP routes, one APIRouter per family; server/app.py includes them all.

images (generations, edits, variations), files (images answered as urls), models (the cards, and the
admin load and unload), lora (adapters at run time), probes (health, readiness, metrics), playground
(the page at /, and /docs, /redoc). A new family is a
module here with a ``router``, included in ``create_app``. What routes share lives on
``app.state`` and is read with the functions below.
"""

from __future__ import annotations

from fastapi import Request

from engine.models import ModelRegistry
from server.serving import ImageServing


def serving(request: Request) -> ImageServing:
    """The shared image request path (set up when the app starts)."""
    return request.app.state.serving


def served_models(request: Request) -> ModelRegistry:
    """The models the server serves, each loaded on demand (started when the app starts)."""
    return request.app.state.models
