"""The ``unet-tile`` command line: ``segment``, ``serve``, and ``synth``/``train``/``evaluate``.

Each subcommand's module registers its parser and sets ``func(args) -> exit code``:
:mod:`.segment`, :mod:`.serve` (the HTTP server of :mod:`service.server`), :mod:`.train`;
:mod:`.common` holds what they share. ``python -m service.cli`` runs :func:`main`.

Exit codes: 0 success; 2 bad input or usage, or an output that cannot be written (disk
full, disk quota exceeded, read-only file system, permission denied): a one-line message
on stderr and no output file left behind (not even a partial one); 1 an unexpected
failure; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import tiling

from ..errors import is_storage_full, storage_error
from . import segment, serve, train
from .common import USER_ERRORS

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``unet-tile`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="unet-tile", description="Large-image U-Net segmentation.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (segment.register, serve.register, train.register):  # each adds its parser, sets func
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unet-tile`` with ``argv`` (default: the process's arguments); the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # before any worker thread exists, so that the server's and the jobs' inference threads
    # share the main heap too (see tiling.keep_freed_memory: page faults on every pass otherwise)
    tiling.keep_freed_memory()
    try:
        return int(args.func(args))
    except USER_ERRORS as e:
        print(f"unet-tile: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_storage_full(e):
            raise
        doing = f"writing {e.filename}" if e.filename else "writing"
        print(f"unet-tile: error: {storage_error(e, doing)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unet-tile: interrupted", file=sys.stderr)
        return 130
