"""The one place where errors become HTTP responses.

The library packages raise their own errors (:mod:`service.errors`, :class:`unet.UNetError`,
:class:`tiling.TilingError`); the HTTP layer adds a few of its own below. Every error
response is JSON ``{"detail": "..."}`` saying what was expected; none carries a stack trace
or a filesystem path. Status codes::

    service.errors.NotATiffError            415
    service.errors.CorruptImageError        400
    service.errors.ImageTooLargeError       413  (also: body over UNET_MAX_UPLOAD_MB)
    service.errors.UnsupportedImageError    422
    service.errors.OptionError              422  (options that do not go together)
    service.errors.InvalidJobIdError        422
    service.errors.JobNotFoundError         404
    service.errors.JobNotReadyError         409
    service.errors.TileNotFoundError        404  (a preview level or tile outside the pyramid)
    service.errors.QuotaExceededError       507  (the jobs directory's quota UNET_JOBS_QUOTA_MB)
    service.errors.JobsOffError             503  without Retry-After (off by the settings: retrying will not help)
    service.errors.JobError (other)         400
    service.errors.InputError (other)       400
    service.errors.StorageFullError         507  (also: any OSError with errno ENOSPC or EDQUOT)
    unet.GeometryError / unet.UNetError     422  (e.g. a tile_size the network cannot take)
    tiling.TilingError                      422
    request validation (query options)      422
    HTTPLayerError
    ├── UnauthorizedError                        401  + WWW-Authenticate: Bearer
    ├── UploadTimeoutError                       408
    ├── UnavailableError                         503  + Retry-After (queue full, not ready, shutting down)
    ├── TimeLimitError                           504
    └── ClientDisconnectedError                  499  (logged and counted; nobody is listening)
    anything else                           500  "internal server error" (details only in the log)

A request that uvicorn cancels at the end of the shutdown grace period (the app stops its
own work a little earlier, see :meth:`service.slots.DeviceSlots.shut_down`; what is left
is an upload still arriving or a grace period of 0) gets the same JSON 503 with
``Retry-After`` from :class:`ShutdownCutoffMiddleware`, not uvicorn's 500 text/plain and a
traceback.

A :class:`unet.CheckpointError` at startup is fatal: the server does not start.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tiling import TilingError
from unet import UNetError

from .errors import (
    CorruptImageError,
    ImageTooLargeError,
    InputError,
    InvalidJobIdError,
    JobError,
    JobNotFoundError,
    JobNotReadyError,
    JobsOffError,
    NotATiffError,
    OptionError,
    QuotaExceededError,
    StorageFullError,
    TileNotFoundError,
    UnsupportedImageError,
    is_storage_full,
)

__all__ = [
    "ClientDisconnectedError",
    "HTTPLayerError",
    "ShutdownCutoffMiddleware",
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
    OptionError: 422,
    InvalidJobIdError: 422,
    JobNotFoundError: 404,
    JobNotReadyError: 409,
    TileNotFoundError: 404,
    QuotaExceededError: 507,
    JobsOffError: 503,
    JobError: 400,
    InputError: 400,
    StorageFullError: 507,
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

    >>> import errno
    >>> status_of(NotATiffError("x")), status_of(UNetError("x")), status_of(KeyError("x"))
    (415, 422, 500)
    >>> status_of(OSError(errno.ENOSPC, "No space left on device")), status_of(PermissionError("x"))
    (507, 500)
    >>> status_of(JobNotFoundError("x")), status_of(QuotaExceededError("x")), status_of(JobError("x"))
    (404, 507, 400)
    """
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 507 if is_storage_full(exc) else 500


_DISK_FULL = "no space left on the server's storage; retry later or send a smaller image"


def _detail(exc: BaseException) -> str:
    """What the client is told: the error's message; for a bare ``OSError`` of a full disk, a fixed
    sentence (its text names the file, which the client has no use for)."""
    if isinstance(exc, OSError) and not isinstance(exc, StorageFullError) and is_storage_full(exc):
        return _DISK_FULL
    return str(exc)


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": scrub(detail)}, status_code=status, headers=dict(headers or {}))


async def _known(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status == 500:
        return await _unexpected(request, exc)
    detail = _detail(exc)
    log.info("%s %s -> %d: %s", request.method, request.url.path, status, detail)
    return error_response(status, detail, getattr(exc, "headers", None))


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


class ShutdownCutoffMiddleware:
    """Answer JSON 503 + ``Retry-After`` for a request that uvicorn cancels as its shutdown grace ends.

    uvicorn cancels the tasks still running after ``timeout_graceful_shutdown``; the
    ``CancelledError`` would pass every exception handler and reach uvicorn, which logs it
    as a traceback and sends 500 text/plain. Only that cancellation reaches this far (a
    client that leaves does not cancel the task), so it is answered here as what it is.
    """

    def __init__(self, app: ASGIApp, retry_after_s: int = 5) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+; on 3.10 nothing counts cancels
            if uncancel is not None:
                uncancel()  # handled: the answer below is this task's last work
            log.info("%s %s cut off by the shutdown", scope.get("method"), scope.get("path"))
            if started:  # mid-response: nothing valid can follow; uvicorn closes the connection
                return
            response = error_response(
                503,
                "server shutting down; the request was cut off, retry later",
                {"Retry-After": str(self.retry_after_s)},
            )
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI, *, retry_after_s: int = 5) -> None:
    """Register the mapping above on ``app`` (``retry_after_s``: sent with a shutdown's 503)."""
    app.add_middleware(ShutdownCutoffMiddleware, retry_after_s=retry_after_s)
    handlers: dict[Any, Any] = {
        InputError: _known,  # the job errors too
        UNetError: _known,
        TilingError: _known,
        OSError: _known,  # a full disk is 507; any other OSError goes on to _unexpected (500)
        HTTPLayerError: _known,
        RequestValidationError: _validation,
        StarletteHTTPException: _http,
        Exception: _unexpected,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
