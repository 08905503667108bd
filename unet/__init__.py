"""The valid-padding U-Net: model, geometry, self-describing checkpoints, training.

This package knows nothing about tiles, files of images or HTTP.
"""

from __future__ import annotations

import logging

from . import geometry
from .checkpoint import Checkpoint, file_sha256, import_state_dict, load_checkpoint, save_checkpoint
from .errors import CheckpointError, GeometryError, UNetError
from .model import UNet, UNetConfig
from .normalization import ChannelAffine, Normalization
from .size import ObjectSize

__all__ = [
    "ChannelAffine",
    "Checkpoint",
    "CheckpointError",
    "GeometryError",
    "Normalization",
    "ObjectSize",
    "UNet",
    "UNetConfig",
    "UNetError",
    "file_sha256",
    "geometry",
    "import_state_dict",
    "load_checkpoint",
    "save_checkpoint",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
