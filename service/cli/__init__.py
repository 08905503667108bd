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
import importlib.metadata
import logging
import sys
from collections.abc import Sequence
from typing import Any

import tiling

from ..errors import is_storage_full, storage_error
from . import export, segment, serve, train
from .common import USER_ERRORS

__all__ = ["build_parser", "main", "version"]


def build_parser() -> argparse.ArgumentParser:
    """The ``unet-tile`` parser with every subcommand."""
    common = argparse.ArgumentParser(add_help=False)  # -v and --version before or after the subcommand
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging (-v info, -vv debug)"
    )
    common.add_argument("--version", action="version", version=f"unet-tile {version()}")
    parser = argparse.ArgumentParser(prog="unet-tile", description="Large-image U-Net segmentation.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in (
        segment.register,
        serve.register,
        train.register,
        export.register,
    ):  # each adds its parser, sets func
        register(_WithCommon(sub, common))
    return parser


class _WithCommon:
    """The subparsers action, giving every subcommand the common options."""

    def __init__(self, sub: Any, common: argparse.ArgumentParser) -> None:
        self.sub, self.common = sub, common

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, parents=[self.common, *kw.pop("parents", [])], **kw)  # type: ignore[no-any-return]


def version() -> str:
    """The installed package's version.

    >>> version().count(".") >= 1
    True
    """
    try:
        return importlib.metadata.version("unet-tile")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``unet-tile`` with ``argv`` (default: the process's arguments); the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", 0)  # counted wherever it was given
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
