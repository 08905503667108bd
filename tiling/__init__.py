"""Overlap-tile inference for valid-padding networks: plan -> run -> stitch.

The engine never knows HTTP or files; it takes arrays and any callable model.
"""

from __future__ import annotations

import logging

from .engine import Output, ProgressCallback, predict_tiles, resolve_batch_size, run, segment
from .errors import TilingError
from .padding import mirror_pad, read_window, reflect_indices
from .plan import Tile, TilePlan, axis_layout, default_stride, plan_tiles
from .predictor import (
    Backend,
    CallablePredictor,
    Predictor,
    TorchPredictor,
    build_predictor,
    keep_freed_memory,
    resolve_backend,
    resolve_device,
    resolve_precision,
)
from .sinks import ArraySink, BandSink, TileSink

__all__ = [
    "ArraySink",
    "Backend",
    "BandSink",
    "CallablePredictor",
    "Output",
    "Predictor",
    "ProgressCallback",
    "Tile",
    "TilePlan",
    "TileSink",
    "TilingError",
    "TorchPredictor",
    "axis_layout",
    "build_predictor",
    "default_stride",
    "keep_freed_memory",
    "mirror_pad",
    "plan_tiles",
    "predict_tiles",
    "read_window",
    "reflect_indices",
    "resolve_backend",
    "resolve_batch_size",
    "resolve_device",
    "resolve_precision",
    "run",
    "segment",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
