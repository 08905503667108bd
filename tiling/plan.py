"""Overlap-tile planning: which input window feeds each tile, and what of its output to keep.

Coordinates. The *padded frame* is the image mirror-padded by the context margin ``m``
on every side (and a little more at the bottom/right so the last tile is whole). A tile
whose output starts at image pixel ``o`` reads the input window ``[o, o + t + 2m)`` of the
padded frame, i.e. image pixels ``[o - m, o + t + m)``.

Seam-free by construction. A valid U-Net of depth ``d`` is translation-equivariant only
for shifts that are multiples of ``P = 2**d`` (its pooling grid must stay aligned). When
every tile origin is a multiple of ``P`` in the padded frame, each tile computes exactly
the values a single forward pass over the whole padded image would compute there, so the
stitched mask *equals* that single pass: no seams, no blending, the overlap is simply
cropped. For 388-px tiles the default stride is therefore 384 (the largest multiple of
16 not above 388: 4 px of overlap, ~2 % extra work). ``stride=388`` reproduces the
paper's layout; its origins (388, 776, ...) are off the pooling grid, so tiles disagree
slightly with their neighbours along their borders (visible seams).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from unet.geometry import context_margin, input_size, pooling_period, smallest_valid_output_at_least

from .errors import TilingError

__all__ = ["Tile", "TilePlan", "axis_layout", "default_stride", "plan_tiles"]

log = logging.getLogger(__name__)


def default_stride(tile: int, period: int) -> int:
    """The largest multiple of the pooling period that does not exceed the tile.

    A tile smaller than the period (only the tiniest images get one) cannot step on the
    grid without gaps; it steps by its own size, which matters only if it repeats.

    >>> default_stride(388, 16), default_stride(644, 16), default_stride(900, 16)
    (384, 640, 896)
    >>> default_stride(4, 16)
    4
    """
    return tile // period * period if tile >= period else tile


def axis_layout(size: int, tile: int, stride: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis as ``(origin, keep_start, keep_stop)``, in image pixels.

    Tile ``i`` produces output pixels ``[origin, origin + tile)`` and keeps
    ``[keep_start, keep_stop)`` of them; overlaps are split in their middle, and the kept
    ranges partition ``[0, size)`` exactly.

    >>> axis_layout(900, 388, 384)
    [(0, 0, 386), (384, 386, 770), (768, 770, 900)]
    >>> axis_layout(5, 388, 384)
    [(0, 0, 5)]
    >>> axis_layout(776, 388, 388)
    [(0, 0, 388), (388, 388, 776)]
    """
    if size < 1:
        raise TilingError(f"an image axis must have at least 1 pixel, got {size}")
    if not 1 <= stride <= tile:
        raise TilingError(f"stride must be between 1 and the tile size {tile}, got {stride}")
    n = 1 if size <= tile else 1 + math.ceil((size - tile) / stride)
    origins = [i * stride for i in range(n)]
    cuts = [0] + [(origins[i + 1] + origins[i] + tile) // 2 for i in range(n - 1)] + [size]
    return [(o, cuts[i], cuts[i + 1]) for i, o in enumerate(origins)]


@dataclass(frozen=True)
class Tile:
    """One tile: where its input comes from and where its kept output goes."""

    index: int
    window: tuple[slice, slice]  # input window in the padded frame (rows, cols)
    keep: tuple[slice, slice]  # part of the tile's output to keep
    dest: tuple[slice, slice]  # where that part goes in the output image


@dataclass(frozen=True)
class TilePlan:
    """Every tile of one 2-D image, in row-major order."""

    image_shape: tuple[int, int]
    tile_out: tuple[int, int]  # output tile (rows, cols)
    tile_in: tuple[int, int]  # input window (rows, cols) = tile_out + 2 * margin
    stride: tuple[int, int]
    margin: int
    period: int
    grid: tuple[int, int]  # tiles per column, per row
    tiles: tuple[Tile, ...]

    @property
    def seam_free(self) -> bool:
        """Whether every origin is on the pooling grid (stitched == one whole pass)."""
        return all(s % self.period == 0 or n == 1 for s, n in zip(self.stride, self.grid, strict=True))

    @property
    def padded_shape(self) -> tuple[int, int]:
        """Shape of the padded frame that the windows index into."""
        return (
            self.tiles[-1].window[0].stop,
            self.tiles[-1].window[1].stop,
        )

    def __len__(self) -> int:
        return len(self.tiles)


def plan_tiles(
    shape: tuple[int, int],
    *,
    depth: int = 4,
    tile_size: int | tuple[int, int] = 388,
    stride: int | tuple[int, int] | None = None,
) -> TilePlan:
    """Plan the tiles that cover an image of ``shape`` = (rows, cols).

    ``tile_size`` is the *output* tile (any valid output size: 388, 644, 900, ...). An axis
    shorter than the tile gets the smallest valid tile that covers it (fewer wasted pixels
    for small images; still seam-free, since origins stay on the grid). ``stride`` defaults
    to the seam-free choice, the largest multiple of ``2**depth`` within the tile.

    >>> p = plan_tiles((900, 300))
    >>> p.grid, p.tile_out, p.tile_in, p.stride, len(p)
    ((3, 1), (388, 308), (572, 492), (384, 304), 3)
    >>> p.tiles[1].window, p.tiles[1].keep, p.tiles[1].dest
    ((slice(384, 956, None), slice(0, 492, None)), (slice(2, 386, None), slice(0, 300, None)), (slice(386, 770, None), slice(0, 300, None)))
    """
    period, margin = pooling_period(depth), context_margin(depth)
    tiles2 = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
    for t in tiles2:
        input_size(t, depth)  # refuses an invalid tile size with the nearest valid ones
    tile_out = tuple(min(t, smallest_valid_output_at_least(n, depth)) for t, n in zip(tiles2, shape, strict=True))
    if stride is None:
        strides = tuple(default_stride(t, period) for t in tile_out)
    else:
        strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
        strides = tuple(min(s, t) for s, t in zip(strides, tile_out, strict=True))
        if any(s % period and n > t for s, t, n in zip(strides, tile_out, shape, strict=True)):
            log.info("stride %s is off the %d-px pooling grid: tiles will show seams", strides, period)
    rows = axis_layout(shape[0], tile_out[0], strides[0])
    cols = axis_layout(shape[1], tile_out[1], strides[1])
    tiles = []
    for r, (oy, ky0, ky1) in enumerate(rows):
        for c, (ox, kx0, kx1) in enumerate(cols):
            tiles.append(
                Tile(
                    index=r * len(cols) + c,
                    window=(slice(oy, oy + tile_out[0] + 2 * margin), slice(ox, ox + tile_out[1] + 2 * margin)),
                    keep=(slice(ky0 - oy, ky1 - oy), slice(kx0 - ox, kx1 - ox)),
                    dest=(slice(ky0, ky1), slice(kx0, kx1)),
                )
            )
    return TilePlan(
        image_shape=(shape[0], shape[1]),
        tile_out=(tile_out[0], tile_out[1]),
        tile_in=(tile_out[0] + 2 * margin, tile_out[1] + 2 * margin),
        stride=(strides[0], strides[1]),
        margin=margin,
        period=period,
        grid=(len(rows), len(cols)),
        tiles=tuple(tiles),
    )
