"""``unet-tile serve``: the flags, and the settings they make; :func:`service.server.serve` runs the server.

Settings come from ``UNET_*`` environment variables (:mod:`service.settings`); flags given
on the command line override them. A setting that does not validate is one line on stderr
per field and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..server import serve
from ..settings import Settings
from .common import positive_int

__all__ = ["register", "settings_from_args"]

# flag dest -> Settings field (the same name); only flags given on the command line override
_FLAGS = (
    "host",
    "port",
    "checkpoint",
    "device",
    "backend",
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
    """Add ``serve`` to the subcommands ``sub``."""
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
        "--backend", choices=["auto", "torch", "openvino"], default=None, help="runtime (UNET_BACKEND, default auto)"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        default=None,
        help="UNET_PRECISION (default auto)",
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
    p.set_defaults(func=_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The environment's settings with the flags that were given on top."""
    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
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
    if settings.spool_dir is not None and not settings.spool_dir.is_dir():
        print(f"unet-tile: error: UNET_SPOOL_DIR is not a directory: {settings.spool_dir}", file=sys.stderr)
        return 2
    return serve(settings)
