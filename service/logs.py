"""Request ids and the log format: ``UNET_LOG_FORMAT=text|json``.

Every HTTP request gets an id: the client's ``X-Request-ID`` when it sends a sensible one (1 to
128 characters of letters, digits and ``._:-``; a proxy's or a tracing header's), else a new
random one. It is sent back as ``X-Request-ID`` on every response, errors included, and is on
every log line written while the request is served (the access line too), so one request's
lines can be found among a busy server's.

``json``: one JSON object per line, ``{"time", "level", "logger", "message", "request_id"}``
(and ``"exception"`` with the traceback when there is one), for log shippers; ``text`` (the
default): the usual lines, the request id in brackets where there is one.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
import secrets
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REQUEST_ID", "JsonFormatter", "RequestIdFilter", "RequestIdMiddleware", "configure_logs", "request_id"]

REQUEST_ID = "X-Request-ID"
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("unet_request_id", default=None)
_LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")


def request_id() -> str | None:
    """The id of the request being served here, if any."""
    return _current.get()


def _accept(value: str | None) -> str:
    """The client's id when it is one we can log and echo safely, else a new one.

    >>> _accept("abc-123"), len(_accept(None)), len(_accept("no spaces please"))
    ('abc-123', 32, 32)
    """
    if value is not None and _ID.fullmatch(value):
        return value
    return secrets.token_hex(16)


class RequestIdMiddleware:
    """Give each HTTP request its id (see the module doc) and send it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = _accept(sent)
        token = _current.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Put the current request's id on every record (``"-"`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record.

    >>> rec = logging.LogRecord("service", logging.INFO, __file__, 1, "job %s done", ("x",), None)
    >>> rec.request_id = "r1"
    >>> json.loads(JsonFormatter().format(rec))["message"], json.loads(JsonFormatter().format(rec))["request_id"]
    ('job x done', 'r1')
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _current.get() if (rid := getattr(record, "request_id", "-")) == "-" else rid,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """The usual line, with ``[request id]`` after the level when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "-")
        record.rid = f" [{rid}]" if rid and rid != "-" else ""
        return super().format(record)


def configure_logs(fmt: Literal["text", "json"]) -> None:
    """Give the root and uvicorn's handlers the format and the request id (after uvicorn's own config)."""
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else _TextFormatter("%(asctime)s %(levelname)s%(rid)s %(name)s: %(message)s")
    )
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
                handler.addFilter(RequestIdFilter())
            if fmt == "json" or name == "":  # uvicorn's text lines keep uvicorn's look
                handler.setFormatter(formatter)
