"""GET /v1/images/files/{file_id}: the images answered with response_format "url"."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/images/files/{file_id}", responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES})
async def image_file(file_id: str, http_request: Request) -> Response:
    """An image answered as a url: no API key needed (the id is the secret), 404 once expired."""
    content, media_type = await asyncio.to_thread(http_request.app.state.store.read, file_id)
    return Response(content, media_type=media_type)
