"""Segment on a Dask cluster: the same engine, the same exact mask, many machines.

An image is cut into *blocks* (:mod:`tiling.blocks`): rectangles of output whose origins are
multiples of the tile stride, each made of the whole-image plan's own tiles, so every tile
origin stays on the pooling grid and the blocks put together equal one machine's mask. One
Dask task computes one block of one plane (:mod:`.tasks`): the worker reads its tiles' input
windows from the shared input with the engine's mirror padding and runs the ordinary engine
(:func:`service.pipeline.run_plane`) with the normalization the client fitted once for the
plane (per-block statistics would make seams).

- :class:`~.plugin.ModelPlugin` loads the checkpoint once per worker (a ``WorkerPlugin``
  holding its path and sha256, checked on the worker); the graph carries no weights.
- An OME-Zarr output is written by the tasks themselves, each into its own chunks
  (:class:`service.omezarr.BlockWriter`), then committed by the client; a TIFF output is
  assembled by the client from the finished blocks, in order, as a streamed sink assembles
  tiles (:mod:`.run`).
- Tasks are idempotent (a block rewrites the same chunks), so the scheduler's retry of a
  task whose worker died changes nothing in the result.

Needs the ``dask`` extra (``pip install 'unet-tile[dask]'``).
"""

from __future__ import annotations

from .plugin import ModelPlugin, plugin_name, worker_state
from .run import DEFAULT_BLOCK_PX, block_for, connect, segment_on_cluster
from .tasks import BlockTask, run_block

__all__ = [
    "DEFAULT_BLOCK_PX",
    "BlockTask",
    "ModelPlugin",
    "block_for",
    "connect",
    "plugin_name",
    "run_block",
    "segment_on_cluster",
    "worker_state",
]
