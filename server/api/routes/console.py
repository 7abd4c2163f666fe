"""GET / and GET /console/{file}: the web console, static files shipped inside the package
(server/api/console/). Nothing is fetched from elsewhere, so the page works offline; the
Content-Security-Policy holds it to that. The page itself needs no API key (app.py lets these
paths through): it asks for one when the API answers 401."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import APIError
from .common import Services

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}
_HEADERS = {
    # Same origin only: scripts, styles, fetches; data: for the empty favicon. frame-ancestors:
    # no other site may frame the console (clickjacking its buttons).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",  # the same, for browsers without CSP level 2
    "X-Content-Type-Options": "nosniff",  # each file only as its declared type
    "Referrer-Policy": "no-referrer",
    # Served from the package: a new version must not be mixed with a cached old file.
    "Cache-Control": "no-cache",
}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)


def router(services: Services) -> APIRouter:
    api = APIRouter()
    # The files are listed once: a name is looked up, never joined onto a path (no traversal).
    files = {p.name: p for p in CONSOLE_DIR.iterdir() if p.suffix in _MEDIA_TYPES}

    @api.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return _file(files["index.html"])

    @api.get("/console/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in files:
            raise APIError(404, f"The console has no file '{name}'", code="not_found")
        return _file(files[name])

    return api
