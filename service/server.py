"""Running the HTTP app under uvicorn (``unet-tile serve`` parses its flags in :mod:`service.cli.serve`).

uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish for up
to ``UNET_SHUTDOWN_TIMEOUT_S``, then cancels what is left (the workers stop at their next
batch) and runs the app's shutdown. :class:`_Server` tells the app when that starts, so a
request still queued or running near the end of the grace period is answered 503 +
``Retry-After`` by the app itself. What one process holds (connections, header and
keep-alive timeouts) is bounded by :mod:`service.connections`.
"""

from __future__ import annotations

import gc
import logging
import math
import socket

import uvicorn

from unet import CheckpointError

from .app import create_app
from .connections import ConnectionLimits, connection_cap, install_log_limits, protocol_class, raise_nofile_limit
from .logs import configure_logs
from .paths import default_checkpoint
from .settings import Settings
from .slots import DeviceSlots

__all__ = ["serve"]

log = logging.getLogger(__name__)

_BACKLOG = 2048  # uvicorn's default listen backlog; asyncio also accepts up to this many in one go


def _connection_limits(settings: Settings) -> ConnectionLimits:
    """The limits for this process, with the cap clamped below its descriptor limit."""
    nofile = raise_nofile_limit()
    cap = connection_cap(settings.max_connections, nofile, _BACKLOG)
    if cap < settings.max_connections:
        log.warning(
            "UNET_MAX_CONNECTIONS=%d lowered to %d: the process may open %d files (RLIMIT_NOFILE)",
            settings.max_connections,
            cap,
            nofile,
        )
    return ConnectionLimits.from_settings(settings, cap)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the device slots when its graceful shutdown starts."""

    def __init__(self, config: uvicorn.Config, slots: DeviceSlots) -> None:
        super().__init__(config)
        self.slots = slots

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # The model, the app and every import are loaded now and live as long as the process:
        # frozen, the collector no longer walks them. Unfrozen, each full collection took
        # ~80-100 ms here, a stall of every connection (/healthz under a burst of thousands).
        gc.freeze()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.slots.shut_down(float(self.config.timeout_graceful_shutdown or 0))
        await super().shutdown(sockets)


def serve(settings: Settings) -> int:
    """Run the app under uvicorn until it stops; the process's exit code (0 after a clean shutdown).

    A missing checkpoint, or one that does not load at start-up, raises
    :class:`unet.CheckpointError` (the server does not start).
    """
    checkpoint = settings.checkpoint or default_checkpoint()  # CheckpointError if the demo is missing
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    logging.getLogger("service").setLevel(settings.log_level.upper())
    app = create_app(settings)
    limits = _connection_limits(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),
        server_header=False,
        lifespan="on",
        http=protocol_class(limits),  # the cap, header timeout and JSON refusals (service.connections)
        backlog=_BACKLOG,
        timeout_keep_alive=math.ceil(limits.keepalive_timeout_s),  # the protocol keeps the exact value
    )
    install_log_limits()  # after Config: it configures uvicorn's loggers
    configure_logs(settings.log_format)
    server = _Server(config, app.state.service.slots)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when start-up fails (port taken, lifespan error)
        error = app.state.service.startup_error
        if error is not None:
            raise error from None  # the CLI prints it in one line (exit 2 for a bad checkpoint)
        return int(e.code) if isinstance(e.code, int) else 1
    return 0 if server.started else 1
