"""Where tile outputs go: the one place that stitches a tile's kept part into an image.

A sink takes ``add(tile, y)`` for every tile of a plan, in the plan's (row-major) order,
then ``finish()`` (MONAI's merger idea). ``y`` is the tile's whole output, (K, th, tw)
scores or (th, tw) labels; the sink keeps ``y[..., tile.keep]`` at ``tile.dest``.

- :class:`ArraySink` stitches into one array (made at the first tile, sized from its output).
- :class:`BandSink` stitches each grid row of tiles into a full-width band and hands the
  band on as soon as its last tile arrives: memory O(tile rows x width), for outputs
  that are written while the image is still being computed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .plan import Tile, TilePlan

__all__ = ["ArraySink", "BandSink", "TileSink"]


class TileSink(Protocol):
    """What the engine hands tile outputs to."""

    def add(self, tile: Tile, y: npt.NDArray[Any]) -> None:
        """Keep ``y[..., tile.keep]`` at ``tile.dest``."""

    def finish(self) -> Any:
        """Every tile was added; returns what the sink made (if anything)."""


class ArraySink:
    """Stitch tile outputs into an array of ``shape`` (..., H, W); rows are shifted by ``row0``.

    ``out`` may be given (written in place), else it is made at the first tile with the
    tile's leading (class) axes and ``dtype``.

    >>> from tiling.plan import plan_tiles
    >>> plan = plan_tiles((5, 7))
    >>> sink = ArraySink(plan.image_shape, np.uint8)
    >>> sink.add(plan.tiles[0], np.ones(plan.tile_out, np.uint8))
    >>> sink.finish().shape
    (5, 7)
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: npt.DTypeLike,
        *,
        out: npt.NDArray[Any] | None = None,
        row0: int = 0,
    ) -> None:
        self.shape, self.dtype, self.out, self.row0 = shape, np.dtype(dtype), out, row0

    def add(self, tile: Tile, y: npt.NDArray[Any]) -> None:
        if self.out is None:
            self.out = np.empty((*y.shape[:-2], *self.shape), self.dtype)
        rows, cols = tile.dest
        self.out[..., rows.start - self.row0 : rows.stop - self.row0, cols] = y[(..., *tile.keep)]

    def finish(self) -> npt.NDArray[Any]:
        if self.out is None:
            raise ValueError("no tile was added")
        return self.out


class BandSink:
    """Stitch each grid row of tiles into a full-width band; ``on_band(band, y0)`` gets it
    once complete (``y0``: its first image row). Bands arrive top to bottom and partition
    the image's rows.

    >>> from tiling.plan import plan_tiles
    >>> plan = plan_tiles((900, 300))
    >>> got = []
    >>> sink = BandSink(plan, np.uint8, lambda band, y0: got.append((y0, band.shape)))
    >>> for t in plan.tiles:
    ...     sink.add(t, np.zeros(plan.tile_out, np.uint8))
    >>> got
    [(0, (386, 300)), (386, (384, 300)), (770, (130, 300))]
    """

    def __init__(self, plan: TilePlan, dtype: npt.DTypeLike, on_band: Callable[[npt.NDArray[Any], int], None]) -> None:
        self.plan, self.dtype, self.on_band = plan, np.dtype(dtype), on_band
        self._band: ArraySink | None = None

    def add(self, tile: Tile, y: npt.NDArray[Any]) -> None:
        ncols = self.plan.grid[1]
        rows = tile.dest[0]
        if tile.index % ncols == 0:
            self._band = ArraySink((rows.stop - rows.start, self.plan.image_shape[1]), self.dtype, row0=rows.start)
        assert self._band is not None, "tiles must arrive in the plan's order"
        self._band.add(tile, y)
        if tile.index % ncols == ncols - 1:
            self.on_band(self._band.finish(), rows.start)
            self._band = None

    def finish(self) -> None:
        if self._band is not None:
            raise ValueError("the last band is incomplete")
