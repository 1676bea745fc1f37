"""GET / (the browser playground), /docs (Swagger UI) and /redoc (ReDoc): pages for people, served
entirely from files on this machine, so they work with no network at all.

The playground is plain HTML, CSS and JavaScript in server/static/ (no build step, no library).
Swagger UI's and ReDoc's built files come from the fastapi-offline package, wired the way
FastAPI documents for self-hosting them (its "Custom Docs UI Static Assets" recipe); ReDoc's
Google Fonts are turned off, and its sidebar's Redocly logo (an image from Redocly's CDN) is
refused by the page's Content-Security-Policy, so it never asks another host for anything.
None of these pages needs an API key; the API calls they make do.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_FILES = Path(__file__).resolve().parents[1] / "static"
DOCS_FILES = Path(str(files("fastapi_offline") / "static"))
PLAYGROUND_ASSETS = "/static/playground"
DOCS_ASSETS = "/static/docs"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"

router = APIRouter(include_in_schema=False)
router.mount(PLAYGROUND_ASSETS, StaticFiles(directory=PLAYGROUND_FILES), name="playground-assets")
router.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_FILES), name="docs-assets")


def _root(request: Request) -> str:
    """The path the app is mounted at behind a proxy ('' when it is not)."""
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(PLAYGROUND_FILES / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
        swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        # No badge from the online validator: it would send the schema's URL to swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        with_google_fonts=False,
    )
    # ReDoc always shows Redocly's logo from their CDN (no option turns it off); refused here, it
    # is never fetched and ReDoc hides it.
    page.headers["Content-Security-Policy"] = "img-src 'self' data:"
    return page
