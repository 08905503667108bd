"""The one place where errors become HTTP responses.

The library packages raise their own errors (:mod:`service.errors`, :class:`unet.UNetError`,
:class:`tiling.TilingError`); the HTTP layer adds a few of its own below. Every error
response is JSON ``{"detail": "..."}`` saying what was expected; none carries a stack trace
or a filesystem path. Status codes::

    service.errors.NotATiffError            415
    service.errors.CorruptImageError        400
    service.errors.ImageTooLargeError       413  (also: body over UNET_MAX_UPLOAD_MB)
    service.errors.UnsupportedImageError    422
    service.errors.InputError (other)       400
    unet.GeometryError / unet.UNetError     422  (e.g. a tile_size the network cannot take)
    tiling.TilingError                      422
    request validation (query options)      422
    HTTPLayerError
    ├── UnauthorizedError                        401  + WWW-Authenticate: Bearer
    ├── UploadTimeoutError                       408
    ├── UnavailableError                         503  + Retry-After (queue full, not ready, shutting down)
    ├── TimeLimitError                   504
    └── ClientDisconnectedError                  499  (logged and counted; nobody is listening)
    anything else                           500  "internal server error" (details only in the log)

A :class:`unet.CheckpointError` at startup is fatal: the server does not start.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tiling import TilingError
from unet import UNetError

from .errors import CorruptImageError, ImageTooLargeError, InputError, NotATiffError, UnsupportedImageError

__all__ = [
    "ClientDisconnectedError",
    "HTTPLayerError",
    "TimeLimitError",
    "UnauthorizedError",
    "UnavailableError",
    "UploadTimeoutError",
    "error_response",
    "install_error_handlers",
    "scrub",
    "status_of",
]

log = logging.getLogger(__name__)


class HTTPLayerError(Exception):
    """An error that only exists because of HTTP: auth, load shedding, time limits."""

    headers: Mapping[str, str] = {}


class UnauthorizedError(HTTPLayerError):
    """Missing or wrong API key."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": 'Bearer realm="unet-tile"'}


class UploadTimeoutError(HTTPLayerError):
    """The client did not finish sending the body within the request's time limit."""


class UnavailableError(HTTPLayerError):
    """The server cannot take this request now; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class TimeLimitError(HTTPLayerError):
    """The segmentation did not finish within the per-request time limit."""


class ClientDisconnectedError(HTTPLayerError):
    """The client went away; its work was abandoned."""


# Most specific first: the first class in an error's MRO found here gives its status.
_STATUS: dict[type[BaseException], int] = {
    NotATiffError: 415,
    CorruptImageError: 400,
    ImageTooLargeError: 413,
    UnsupportedImageError: 422,
    InputError: 400,
    UNetError: 422,
    TilingError: 422,
    UnauthorizedError: 401,
    UploadTimeoutError: 408,
    UnavailableError: 503,
    TimeLimitError: 504,
    ClientDisconnectedError: 499,
}

_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[/\\](?:[\w.+~-]+[/\\])+[\w.+~-]*")


def scrub(message: str) -> str:
    """Remove filesystem paths from a message meant for a client.

    >>> scrub("cannot read /tmp/unet-upload-x1/part.tif: truncated")
    'cannot read <path>: truncated'
    >>> scrub("nearest valid sizes: 388 or 404 (16k-60)")
    'nearest valid sizes: 388 or 404 (16k-60)'
    """
    return _PATH.sub("<path>", message)


def status_of(exc: BaseException) -> int:
    """The HTTP status for an error (500 for anything unexpected).

    >>> status_of(NotATiffError("x")), status_of(UNetError("x")), status_of(KeyError("x"))
    (415, 422, 500)
    """
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": scrub(detail)}, status_code=status, headers=dict(headers or {}))


async def _known(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status == 500:
        return await _unexpected(request, exc)
    log.info("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    return error_response(status, str(exc), getattr(exc, "headers", None))


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return error_response(422, "; ".join(parts) or "invalid request")


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping above on ``app``."""
    handlers: dict[Any, Any] = {
        InputError: _known,
        UNetError: _known,
        TilingError: _known,
        HTTPLayerError: _known,
        RequestValidationError: _validation,
        StarletteHTTPException: _http,
        Exception: _unexpected,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
