"""Where the bundled demo checkpoint lives, and where converted networks are cached."""

from __future__ import annotations

import os
from pathlib import Path

from unet.checkpoint import DEMO_CHECKPOINT
from unet.errors import CheckpointError

__all__ = ["DEMO_CHECKPOINT", "cache_dir", "default_checkpoint"]


def default_checkpoint() -> Path:
    """The bundled demo checkpoint, or a clear error if this install lacks it."""
    if not DEMO_CHECKPOINT.is_file():
        raise CheckpointError(f"no --checkpoint given and the bundled demo checkpoint is missing ({DEMO_CHECKPOINT})")
    return DEMO_CHECKPOINT


def cache_dir() -> Path:
    """Where the OpenVINO backend keeps the networks it converted (one per checkpoint):
    ``UNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/unet-tile``, else ``~/.cache/unet-tile``.

    >>> os.environ["UNET_CACHE_DIR"] = "/tmp/c"; str(cache_dir()); del os.environ["UNET_CACHE_DIR"]
    '/tmp/c'
    """
    explicit = os.environ.get("UNET_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "unet-tile" if xdg else Path.home() / ".cache" / "unet-tile"
