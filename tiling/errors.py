"""Errors raised by the :mod:`tiling` package::

ValueError
└── TilingError     an image, tile layout or model output the engine cannot use
"""

from __future__ import annotations

__all__ = ["TilingError"]


class TilingError(ValueError):
    """An image, tile layout or model output that the tiling engine refuses."""
