"""One cluster task: one block of one plane, computed by the ordinary engine on a worker.

A :class:`BlockTask` is small (paths, the block's own tile plan, the plane's normalization):
the worker opens the input itself (:meth:`~service.cluster.plugin.WorkerState.source`),
reads each tile's window with the engine's mirror padding over the *whole* plane, and runs
:func:`service.pipeline.run_plane` (the same normalization and no-data rule as one machine)
into an array of the block's shape. With a :class:`~service.omezarr.BlockWriter` the task
writes the block into the output store itself and returns nothing; else it returns the
block's labels (or probabilities) for the client to assemble. Writing the same block twice
writes the same bytes to the same chunks: a task retried after its worker died is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tiling import ArraySink, Output, Tile, TilePlan
from tiling.rescale import RescaledPlane
from unet import ChannelAffine

from ..errors import CorruptImageError, InputError
from ..pipeline import run_plane
from .plugin import worker_state

__all__ = ["BlockTask", "run_block"]


@dataclass(frozen=True)
class BlockTask:
    """Everything a worker needs for one block (pickled into the graph; a few KB)."""

    plugin: str  # the ModelPlugin's name (checkpoint, device, precision)
    input: str  # path every worker can read
    series: int
    plane: int
    block: Tile  # the block in the image (dest: its rectangle)
    plan: TilePlan  # the block's own plan (tiling.blocks.block_plan)
    affine: ChannelAffine  # the plane's normalization, fitted once by the client
    output: Output = "labels"
    writer: Any = None  # a service.omezarr.BlockWriter: write the block there, return None
    scaled: tuple[int, int] | None = None  # the plane rescaled to this (Y, X) first (service.scale)

    @property
    def tiles(self) -> int:
        return len(self.plan)


def run_block(task: BlockTask) -> npt.NDArray[Any] | None:
    """Compute ``task``'s block; write it (``task.writer``) or return it."""
    from distributed import get_worker  # noqa: PLC0415  (only ever called on a worker)

    state = worker_state(task.plugin)
    segmenter = state.segmenter
    try:
        plane = state.source(task.input, task.series).plane(task.plane)
        if task.scaled is not None:
            plane = RescaledPlane(plane, task.scaled)
    except InputError as e:
        raise type(e)(f"worker {get_worker().address}: {e}") from None
    except OSError as e:
        raise InputError(f"worker {get_worker().address} cannot read the input {task.input}: {e}") from None
    rows, cols = task.block.dest
    dtype = np.uint8 if task.output == "labels" else np.float32
    sink = ArraySink(task.plan.image_shape, dtype)
    try:
        y = run_plane(segmenter, plane, task.plan, task.affine, sink, task.output)
    except CorruptImageError as e:
        raise CorruptImageError(f"worker {get_worker().address}: {e}") from None
    if task.writer is None:
        return np.asarray(y)
    image = None
    if task.writer.image_arrays:  # a new store holds a copy of the image: the block's pixels, read once more
        image = np.asarray(plane[:, rows, cols])
    task.writer.write(task.plane, rows.start, cols.start, y, image)
    return None
