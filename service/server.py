"""``unet-tile serve``: run the HTTP app under uvicorn.

Settings come from ``UNET_*`` environment variables (:mod:`service.settings`); flags given
on the command line override them. uvicorn handles SIGTERM/SIGINT: it stops accepting,
lets in-flight requests finish for up to ``UNET_SHUTDOWN_TIMEOUT_S``, then cancels what is
left (the workers stop at their next batch) and runs the app's shutdown. :class:`_Server`
tells the app when that starts, so a request still queued or running near the end of the
grace period is answered 503 + ``Retry-After`` by the app itself. What one process holds
(connections, header and keep-alive timeouts) is bounded by :mod:`service.connections`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from unet import CheckpointError

from .app import create_app
from .cli import positive_int
from .connections import ConnectionLimits, connection_cap, install_log_limits, protocol_class, raise_nofile_limit
from .limits import DeviceSlots
from .paths import default_checkpoint
from .settings import Settings

__all__ = ["register", "serve", "settings_from_args"]

log = logging.getLogger(__name__)

_BACKLOG = 2048  # uvicorn's default listen backlog; asyncio also accepts up to this many in one go

# flag dest -> Settings field (the same name); only flags given on the command line override
_FLAGS = (
    "host",
    "port",
    "checkpoint",
    "device",
    "precision",
    "batch_size",
    "slots",
    "queue_size",
    "max_upload_mb",
    "max_pixels",
    "request_timeout_s",
    "log_level",
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the HTTP API (POST /segment, /healthz, /readyz, /model, /metrics, /docs)",
        description="Serve the HTTP API. Flags override the UNET_* environment variables.",
    )
    p.add_argument("--host", default=None, help="address to listen on (UNET_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (UNET_PORT, default 8000)")
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (UNET_CHECKPOINT, default: demo)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="UNET_DEVICE (default auto)")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None, help="UNET_PRECISION (default auto)"
    )
    p.add_argument("--batch-size", type=positive_int, default=None, help="tiles per forward pass (UNET_BATCH_SIZE)")
    p.add_argument("--slots", type=positive_int, default=None, help="segmentations at once (UNET_SLOTS, default 1)")
    p.add_argument("--queue-size", type=int, default=None, help="waiting requests beyond the slots (UNET_QUEUE_SIZE)")
    p.add_argument("--max-upload-mb", type=float, default=None, help="largest body in MiB (UNET_MAX_UPLOAD_MB)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest image in pixels (UNET_MAX_PIXELS)")
    p.add_argument("--request-timeout-s", type=float, default=None, help="per-request limit (UNET_REQUEST_TIMEOUT_S)")
    p.add_argument(
        "--log-level", choices=["critical", "error", "warning", "info", "debug"], default=None, help="UNET_LOG_LEVEL"
    )
    p.set_defaults(func=serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The environment's settings with the flags that were given on top."""
    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    return Settings(**overrides)


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


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        for err in e.errors():
            name = ".".join(str(p) for p in err["loc"])
            print(
                f"unet-tile: error: invalid setting UNET_{name.upper()} / --{name.replace('_', '-')}: {err['msg']}",
                file=sys.stderr,
            )
        return 2
    checkpoint = settings.checkpoint or default_checkpoint()  # CheckpointError (exit 2) if the demo is missing
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    if settings.spool_dir is not None and not settings.spool_dir.is_dir():
        print(f"unet-tile: error: UNET_SPOOL_DIR is not a directory: {settings.spool_dir}", file=sys.stderr)
        return 2
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
    server = _Server(config, app.state.service.slots)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits when start-up fails (port taken, lifespan error)
        error = app.state.service.startup_error
        if error is not None:
            raise error from None  # the CLI prints it in one line (exit 2 for a bad checkpoint)
        return int(e.code) if isinstance(e.code, int) else 1
    return 0 if server.started else 1
