"""Errors raised by the :mod:`unet` package.

One small vocabulary, rooted in a builtin so callers may catch ``ValueError``::

    ValueError
    └── UNetError              anything this package refuses
        ├── GeometryError      an input/output size the valid U-Net cannot take
        └── CheckpointError    a checkpoint that is corrupt, foreign or does not match
"""

from __future__ import annotations

__all__ = ["CheckpointError", "GeometryError", "UNetError"]


class UNetError(ValueError):
    """Base class of every error the :mod:`unet` package raises on bad input."""


class GeometryError(UNetError):
    """A size that a valid-padding U-Net of the given depth cannot process."""


class CheckpointError(UNetError):
    """A checkpoint file that is corrupt, of another format, or does not match."""
