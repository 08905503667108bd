"""Blocks: rectangles of output made of whole tiles of one plan, for running a plan in pieces.

A cluster (or any caller that splits one image over workers) cuts the output into blocks
whose origins are multiples of the plan's stride, so each block's tiles are *the plan's own
tiles* (same origins on the pooling grid, same input windows in the padded frame, same
tile size); only where a tile's kept part ends moves, to the block's edge. Each block is
therefore exactly what the whole-image run computes there, and blocks put together equal
it pixel for pixel (an identity network gives the input back through any block layout).

- :func:`plan_blocks` lays the blocks over an image: a :class:`BlockGrid`, which is also a
  :class:`~tiling.plan.TilePlan` whose "tiles" are the blocks, so any tile sink (an
  :class:`~tiling.sinks.ArraySink`, a :class:`~tiling.sinks.BandSink`, a streamed file
  writer) assembles finished blocks as it assembles tiles, in the same row-major order;
- :func:`block_plan` gives one block's own plan: the plan's tiles that cover it, their
  windows unchanged, their kept parts and destinations within the block, for
  :func:`tiling.run` with a sink of the block's shape.

Mirror padding stays the engine's (:func:`tiling.read_window` on the whole image), never
a per-block pad; this is why blocks are not ``dask.array.map_overlap(boundary="reflect")``,
whose ``reflect`` repeats the edge pixel (numpy's ``symmetric``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .errors import TilingError
from .plan import Tile, TilePlan

__all__ = ["BlockGrid", "block_plan", "block_size", "plan_blocks"]


def block_size(stride: int, *, align: int = 1, at_least: int = 3072) -> int:
    """The smallest common multiple of ``stride`` and ``align`` (a chunk size the blocks must
    not split) that is at least ``at_least`` pixels.

    >>> block_size(384, align=256), block_size(640, align=256), block_size(384, at_least=1)
    (3072, 3840, 384)
    """
    if stride < 1 or align < 1 or at_least < 1:
        raise TilingError(f"stride, align and at_least must be positive, got {stride}, {align}, {at_least}")
    unit = math.lcm(stride, align)
    return unit * max(1, -(-at_least // unit))


@dataclass(frozen=True)
class BlockGrid(TilePlan):
    """The blocks of one plan, as a plan whose tiles are blocks (``tile_out``: the block size).

    Each "tile" keeps all of its block: ``keep`` is ``(0:h, 0:w)`` of the block's own output
    and ``dest`` the block's rectangle of the image; ``window`` is ``dest`` too (blocks read
    through :func:`block_plan`, not one window). ``tiles`` of the whole-image plan stay in
    :attr:`plan`.
    """

    plan: TilePlan | None = None

    def block(self, index: int) -> Tile:
        return self.tiles[index]


def _check_block(plan: TilePlan, size: tuple[int, int]) -> None:
    for b, s, n in zip(size, plan.stride, plan.grid, strict=True):
        if b < 1 or (n > 1 and b % s):
            raise TilingError(f"a block side must be a positive multiple of the stride {plan.stride}, got {size}")


def plan_blocks(plan: TilePlan, size: int | tuple[int, int]) -> BlockGrid:
    """Blocks of ``size`` output pixels (a multiple of the stride on every axis with more than
    one tile; the last block of a row or column holds what is left) over ``plan``'s image.

    >>> from tiling.plan import plan_tiles
    >>> g = plan_blocks(plan_tiles((1000, 500)), 768)
    >>> g.grid, [t.dest for t in g.tiles]
    ((2, 1), [(slice(0, 768, None), slice(0, 500, None)), (slice(768, 1000, None), slice(0, 500, None))])
    """
    sizes = (size, size) if isinstance(size, int) else (size[0], size[1])
    _check_block(plan, sizes)
    h, w = plan.image_shape
    rows = [(y, min(y + sizes[0], h)) for y in range(0, h, sizes[0])]
    cols = [(x, min(x + sizes[1], w)) for x in range(0, w, sizes[1])]
    tiles = []
    for r, (y0, y1) in enumerate(rows):
        for c, (x0, x1) in enumerate(cols):
            dest = (slice(y0, y1), slice(x0, x1))
            keep = (slice(0, y1 - y0), slice(0, x1 - x0))
            tiles.append(Tile(index=r * len(cols) + c, window=dest, keep=keep, dest=dest))
    return BlockGrid(
        image_shape=plan.image_shape,
        tile_out=(min(sizes[0], h), min(sizes[1], w)),
        tile_in=(min(sizes[0], h), min(sizes[1], w)),
        stride=sizes,
        margin=0,
        period=plan.period,
        grid=(len(rows), len(cols)),
        tiles=tuple(tiles),
        plan=plan,
    )


def _axis(start: int, stop: int, stride: int, tile: int, n: int) -> list[tuple[int, int, int]]:
    """The plan's tiles along one axis that cover ``[start, stop)``, as (tile index, keep start,
    keep stop) in image pixels: the plan's midpoint cuts inside, the block's edges outside."""
    first, last = min(start // stride, n - 1), min(n - 1, -(-stop // stride) - 1)
    first = min(first, last)
    origins = [i * stride for i in range(first, last + 1)]
    cuts = [start] + [(a + b + tile) // 2 for a, b in itertools.pairwise(origins)] + [stop]
    return [(first + k, cuts[k], cuts[k + 1]) for k in range(len(origins))]


def block_plan(plan: TilePlan, block: Tile) -> TilePlan:
    """The plan of one block (a tile of :func:`plan_blocks`): ``plan``'s tiles that cover it,
    with their windows (in the whole image's padded frame) unchanged and their kept parts
    partitioning the block; ``dest`` and ``image_shape`` are the block's own (its row 0 is
    the block's first row).

    >>> from tiling.plan import plan_tiles
    >>> p = plan_tiles((900, 300))
    >>> g = plan_blocks(p, 384)
    >>> b = block_plan(p, g.tiles[1])
    >>> b.image_shape, [(t.window[0], t.keep[0], t.dest[0]) for t in b.tiles]
    ((384, 300), [(slice(384, 956, None), slice(0, 384, None), slice(0, 384, None))])
    """
    (y0, y1), (x0, x1) = ((s.start, s.stop) for s in block.dest)
    (th, tw), (sy, sx), m = plan.tile_out, plan.stride, plan.margin
    ny, nx = plan.grid
    rows, cols = _axis(y0, y1, sy, th, ny), _axis(x0, x1, sx, tw, nx)
    tiles = []
    for r, (i, ky0, ky1) in enumerate(rows):
        for c, (j, kx0, kx1) in enumerate(cols):
            oy, ox = i * sy, j * sx
            tiles.append(
                Tile(
                    index=r * len(cols) + c,
                    window=(slice(oy, oy + th + 2 * m), slice(ox, ox + tw + 2 * m)),
                    keep=(slice(ky0 - oy, ky1 - oy), slice(kx0 - ox, kx1 - ox)),
                    dest=(slice(ky0 - y0, ky1 - y0), slice(kx0 - x0, kx1 - x0)),
                )
            )
    return TilePlan(
        image_shape=(y1 - y0, x1 - x0),
        tile_out=plan.tile_out,
        tile_in=plan.tile_in,
        stride=plan.stride,
        margin=m,
        period=plan.period,
        grid=(len(rows), len(cols)),
        tiles=tuple(tiles),
    )
