"""Where the bundled demo checkpoint lives."""

from __future__ import annotations

from pathlib import Path

from unet.checkpoint import DEMO_CHECKPOINT
from unet.errors import CheckpointError

__all__ = ["DEMO_CHECKPOINT", "default_checkpoint"]


def default_checkpoint() -> Path:
    """The bundled demo checkpoint, or a clear error if this install lacks it."""
    if not DEMO_CHECKPOINT.is_file():
        raise CheckpointError(f"no --checkpoint given and the bundled demo checkpoint is missing ({DEMO_CHECKPOINT})")
    return DEMO_CHECKPOINT
