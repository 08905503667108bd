"""The user-facing layer: TIFF I/O, the ``unet-tile`` CLI, the HTTP app and jobs."""

from __future__ import annotations

import logging

__all__: list[str] = []

logging.getLogger(__name__).addHandler(logging.NullHandler())
