"""What one server holds: a connection cap, header and keep-alive timeouts, JSON refusals.

uvicorn alone keeps every connection it accepts for as long as the client likes: a socket
that never sends a byte, or trickles its request head one byte at a time (slowloris), is
never closed, so enough of them exhaust the process's file descriptors; then ``accept()``
fails with EMFILE, asyncio logs a traceback for every retry (thousands a second) and even
``/healthz`` stops answering. :class:`GuardedH11Protocol` (uvicorn's h11 protocol with a few
additions, passed as ``uvicorn.Config(http=...)``) bounds that:

* **connection cap** (``UNET_MAX_CONNECTIONS``, clamped below ``RLIMIT_NOFILE`` by
  :func:`connection_cap`): a connection beyond the cap and its health reserve is answered at
  once with a JSON 503 + ``Retry-After`` and closed, before anything is read;
* **health reserve**: the :data:`HEALTH_RESERVE` connections just past the cap may ask only
  ``/healthz`` or ``/readyz`` (anything else gets the JSON 503) and must send their request
  head within :data:`RESERVE_HEADER_TIMEOUT_S`; a probe that sends its request at once so
  gets through a full server, and idle sockets cannot hold the reserve for long;
* **header timeout** (``UNET_HEADER_TIMEOUT_S``): a connection whose request head is not
  complete within that time of connecting, or of its previous response, is closed (with a
  JSON 408 if part of a head arrived); each timer runs up to :data:`HEADER_TIMEOUT_SPREAD`
  longer, at random, so that thousands of sockets opened in one burst are not closed (and
  reopened) in one burst every timeout;
* **keep-alive timeout** (``UNET_KEEPALIVE_TIMEOUT_S``): uvicorn's, an idle kept-alive
  connection is closed;
* **in-flight requests** are bounded by the same total as connections (uvicorn's
  ``limit_concurrency``, answered here in JSON; health routes are exempt);
* uvicorn's own refusals of malformed requests (a head over 16 KiB, a bad
  ``Content-Length``) carry JSON ``{"detail": ...}`` bodies like every other error.

When the descriptors run out anyway (the limit lowered, other files open, a flood faster
than connections close), the event loop's exception handler closes the idle connections
(:class:`_ShedOnAcceptError`) so that the next accept gets ``/healthz`` through, and
:class:`RateLimitFilter` keeps the log bounded: one line per kind per interval, with the
count of those suppressed, and no traceback.

A closed connection leaves no reference cycle behind (the protocol breaks those through
bound methods, its own and asyncio's transport's): it is freed at once. With cycles, the
cyclic collector's full passes over the garbage of thousands of connections stalled the
event loop ~0.1 s each (the 5,000-connection load of ``bench.load``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import resource
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import Settings

__all__ = [
    "ACCEPT_ERROR",
    "HEADER_TIMEOUT_SPREAD",
    "HEALTH_PATHS",
    "HEALTH_RESERVE",
    "RESERVE_HEADER_TIMEOUT_S",
    "ConnectionLimits",
    "GuardedH11Protocol",
    "RateLimitFilter",
    "connection_cap",
    "install_log_limits",
    "json_response",
    "protocol_class",
    "raise_nofile_limit",
]

log = logging.getLogger(__name__)

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
HEALTH_RESERVE = 16  # connections past the cap kept for health probes
RESERVE_HEADER_TIMEOUT_S = 1.0  # a probe sends its request at once; an idle socket must not hold the reserve
HEADER_TIMEOUT_SPREAD = 0.2  # a header timeout fires between 1x and 1.2x its value
LINGER_S = 2.0  # after a 4xx that ends a connection, what the client still sends is read and dropped this long
APP_FDS = 256  # descriptors kept for the app itself: checkpoint, spooled uploads, jobs, logs, pipes
ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message on EMFILE/ENFILE
_REFUSED = "connection refused:"
_TIMED_OUT = "connection closed:"
_INVALID = "Invalid HTTP request received."  # uvicorn's warning for each malformed request


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return the soft limit in force.

    Many systems start processes with a soft limit of 1024 and a far higher hard one; the
    cap below is derived from what the process may really open.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:  # e.g. above fs.nr_open
        log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, e)
        return soft
    return target


def connection_cap(wanted: int, nofile: int, backlog: int) -> int:
    """The connection cap for a process that may open ``nofile`` descriptors.

    Kept free below the limit: the health reserve, :data:`APP_FDS` for the app, and one
    ``backlog`` of connections that asyncio may accept in one go before they are refused
    (at most half the limit on a small one). At least 1.

    >>> connection_cap(8192, 20000, 2048)
    8192
    >>> connection_cap(8192, 4096, 2048)
    2032
    >>> connection_cap(8192, 1024, 2048)
    496
    """
    reserve = min(nofile // 2, APP_FDS + backlog)
    return max(1, min(wanted, nofile - reserve - HEALTH_RESERVE))


@dataclass(frozen=True)
class ConnectionLimits:
    """What one server process holds; see the module docstring."""

    max_connections: int
    header_timeout_s: float
    keepalive_timeout_s: float
    retry_after_s: int
    health_reserve: int = HEALTH_RESERVE
    max_head_bytes: int = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE

    @classmethod
    def from_settings(cls, settings: Settings, max_connections: int) -> ConnectionLimits:
        return cls(
            max_connections=max_connections,
            header_timeout_s=settings.header_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            retry_after_s=settings.retry_after_s,
        )

    @property
    def hard_limit(self) -> int:
        """Connections held at most: the cap and its health reserve."""
        return self.max_connections + self.health_reserve


def json_response(status: int, detail: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 response with a JSON ``{"detail": ...}`` body that closes the connection.

    Written straight to the socket: h11 cannot answer a request it has not parsed.

    >>> json_response(503, "busy", [("retry-after", "5")]).split(b"\\r\\n")[:2]
    [b'HTTP/1.1 503 Service Unavailable', b'content-type: application/json']
    """
    body = json.dumps({"detail": detail}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    lines += [f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 sees a request head end


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the cap, the reserve, the header timeout and JSON refusals.

    Use :func:`protocol_class` for a subclass bound to its :class:`ConnectionLimits`.
    """

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._protocol_error: tuple[int, str] | None = None  # why h11 refused the peer's bytes: status, message
        self.conn.next_event = self._next_event  # type: ignore[method-assign]
        self.timeout_keep_alive = self.limits.keepalive_timeout_s  # type: ignore[assignment]  # float is fine
        self.limit_concurrency = None  # checked in _guarded, answered in JSON
        self._app = self.app
        self.app = self._guarded
        self._reserved = False  # in the health reserve: health routes only
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return h11.Connection.next_event(self.conn)
        except h11.RemoteProtocolError as e:
            self._protocol_error = (e.error_status_hint, str(e))  # not e: its traceback holds this frame
            raise e.with_traceback(None) from None  # h11's frames in it hold the error: a cycle per bad request

    # connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.loop.get_exception_handler() is None:  # the first connection: shed idle ones on EMFILE
            self.loop.set_exception_handler(_ShedOnAcceptError(self.connections))
        held = len(self.connections)
        if held >= self.limits.hard_limit:
            self.transport = transport  # connection_lost closes it; flow and cycle stay None
            detail = (
                f"too many connections: this server holds at most {self.limits.max_connections}"
                f" (UNET_MAX_CONNECTIONS); retry after {self.limits.retry_after_s} s"
            )
            transport.write(json_response(503, detail, [("retry-after", str(self.limits.retry_after_s))]))
            transport.close()
            log.warning("%s over the cap of %d connections (503)", _REFUSED, self.limits.max_connections)
            return
        super().connection_made(transport)
        self._reserved = held >= self.limits.max_connections
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)
        # Break the cycles through bound methods (see the module docstring): freed at once.
        self.conn.__dict__.pop("next_event", None)
        self.app = self._app
        state = vars(self.transport)  # asyncio's (3.11) transport holds a bound method of its own
        if state.get("_read_ready_cb") is not None:
            state["_read_ready_cb"] = None  # no read follows connection_lost

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # the answer is sent; the rest of the request is dropped
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            log.warning("%s request head over %d bytes (431)", _INVALID, self.limits.max_head_bytes)
            self._answer_and_close(json_response(431, f"request head larger than {self.limits.max_head_bytes} bytes"))
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection is done)
            self._cancel_head_timer()

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the request head now arriving is over the limit.

        h11 bounds only a head that is still incomplete when it parses, so a 100 KB head
        that arrives in one read got through; here the head is measured (up to its blank
        line; a body that came with it does not count).
        """
        buffered = self.conn.trailing_data[0]  # at most one limit's worth: h11 refuses more
        if len(buffered) + len(data) <= self.limits.max_head_bytes:
            return False
        end = _HEAD_END.search(buffered + data)
        head = end.start() if end is not None else len(buffered) + len(data)
        return head > self.limits.max_head_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the next head has its own time limit, counted from this response

    def waiting_for_head(self) -> bool:
        """Open, and no request in progress: nothing but a new request would be lost by closing."""
        cycle_done = self.cycle is None or self.cycle.response_complete
        return (
            not self.transport.is_closing()
            and self._linger_timer is None
            and self.conn.their_state is h11.IDLE
            and cycle_done
        )

    def close_idle(self) -> None:
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self.transport.close()

    # the header timeout

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        timeout = self.limits.header_timeout_s
        if self._reserved:
            timeout = min(timeout, RESERVE_HEADER_TIMEOUT_S)
        # Up to HEADER_TIMEOUT_SPREAD later: connections opened together (a client pool, an
        # attack) are not all closed, and reopened, in the same instant.
        delay = timeout * (1 + HEADER_TIMEOUT_SPREAD * random.random())
        self._head_timer = self.loop.call_later(delay, self._head_timed_out, timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self, timeout: float) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why the connection ends
            detail = f"request head not complete within {timeout:g} s (UNET_HEADER_TIMEOUT_S)"
            log.warning("%s request head not complete within %g s (408)", _TIMED_OUT, timeout)
            self._answer_and_close(json_response(408, detail))
            return
        self._unset_keepalive_if_required()
        self.transport.close()

    def _answer_and_close(self, response: bytes) -> None:
        """Send a final response, then drop what the client still sends for up to :data:`LINGER_S`.

        Closing a socket with unread bytes in it makes the kernel reset the connection, and
        a client still sending (a 1 MB head) may then never read the answer. The connection
        ends when the client closes its side, or after :data:`LINGER_S`.
        """
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self.transport.write(response)
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
        self.flow.resume_reading()

    # JSON where uvicorn answers in text

    def send_400_response(self, msg: str) -> None:
        status, reason = self._protocol_error or (400, "")
        if status == 431:
            detail = f"request head larger than {self.limits.max_head_bytes} bytes"
        else:
            detail = f"invalid HTTP request: {reason}"[:300] if reason else msg
        if status not in (400, 431, 501):
            status = 400
        self._answer_and_close(json_response(status, detail))

    async def _guarded(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        health = scope.get("path") in HEALTH_PATHS
        if health or not (self._reserved or len(self.tasks) > self.limits.hard_limit):
            await self._app(scope, receive, send)
            return
        detail = (
            f"too many connections: this server holds at most {self.limits.max_connections}"
            f" (UNET_MAX_CONNECTIONS), the rest only answer /healthz and /readyz;"
            f" retry after {self.limits.retry_after_s} s"
        )
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.limits.retry_after_s).encode()),
            (b"connection", b"close"),
        ]
        log.warning(
            "%s %s over the cap of %d connections (503)", _REFUSED, scope.get("path"), self.limits.max_connections
        )
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class _ShedOnAcceptError:
    """The event loop's exception handler: on EMFILE/ENFILE at accept, close the idle connections.

    asyncio stops accepting for a second after such an error, then tries again. What
    holds the descriptors then is usually idle sockets (the ones just accepted among them,
    whose protocols start a moment later, hence the short delay), so closing those lets the
    next try accept ``/healthz`` and the other waiting clients instead of waiting out their
    header timeouts. The error itself is logged as asyncio does, through
    :class:`RateLimitFilter`.
    """

    delay_s = 0.1

    def __init__(self, connections: set[Any]) -> None:
        self.connections = connections
        self.pending = False

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR and not self.pending:
            self.pending = True
            loop.call_later(self.delay_s, self.shed)
        loop.default_exception_handler(context)

    def shed(self) -> None:
        self.pending = False
        idle = [c for c in list(self.connections) if isinstance(c, GuardedH11Protocol) and c.waiting_for_head()]
        for c in idle:
            c.close_idle()
        log.warning("%s out of file descriptors: closed %d idle connections", _TIMED_OUT, len(idle))


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class RateLimitFilter(logging.Filter):
    """At most one record per kind (message prefix) every ``interval_s``, without traceback.

    The record let through says how many like it were dropped since the last one. Records
    of other kinds pass untouched.
    """

    def __init__(self, prefixes: Iterable[str], interval_s: float = 10.0) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        kind = next((p for p in self.prefixes if message.startswith(p)), None)
        if kind is None:
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self.interval_s) < self.interval_s:
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return False
            self._last[kind] = now
            dropped = self._dropped.pop(kind, 0)
        line = message.splitlines()[0]
        if record.exc_info and record.exc_info[1] is not None:
            line += f": {record.exc_info[1]}"
        if dropped:
            line += f" ({dropped} more like it in the previous {self.interval_s:g} s not logged)"
        record.msg, record.args = line, ()
        record.exc_info, record.exc_text = None, None
        return True


def install_log_limits(interval_s: float = 10.0) -> RateLimitFilter:
    """Rate-limit the log lines that a flood of connections would repeat (see the module doc)."""
    # the job worker retries its queue every second: out of descriptors or disk, each retry would log
    job_retries = ["cannot claim a job", "cannot read the job queue", "job housekeeping failed"]
    limiter = RateLimitFilter([ACCEPT_ERROR, _REFUSED, _TIMED_OUT, _INVALID, *job_retries], interval_s)
    for name in ("asyncio", "uvicorn.error", __name__, "service.jobs"):
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimitFilter)]:
            logger.removeFilter(old)
        logger.addFilter(limiter)
    return limiter
