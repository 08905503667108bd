"""``GET /``: the page that drops TIFFs into ``/jobs`` and shows the result (``service/static``).

Served by the app itself, no build step, no library and nothing from the internet: the page,
its script and its style sheet are three files, sent with a Content-Security-Policy that lets
the page reach this server only. The page needs no API key to load; the requests it makes
carry the key the person types in (kept in the tab's ``sessionStorage``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

__all__ = ["STATIC", "page", "router", "static"]

router = APIRouter(tags=["page"], include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
_HEADERS = {
    # everything from this server; images drawn from blobs of the tiles it sends
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none';"
    " frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}")
async def static(name: Annotated[str, PathParam(pattern=r"^app\.(js|css)$")]) -> FileResponse:
    return FileResponse(STATIC / name, media_type=_TYPES[name], headers=_HEADERS)
