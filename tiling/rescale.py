"""Segmenting at another scale: a lazy rescaled view in, the result mapped back out.

When the objects of an image are much larger (or smaller) than those a model was trained on,
the image is resampled by a factor ``f`` (rescaled size / input size) before tiling, and the
class scores are resampled back to exactly the input's shape afterwards.

- :func:`axis_weights` is the one resampling operator, separable per axis: output pixel
  ``i`` (centre at ``(i + 0.5) * n_in / n_out - 0.5`` in input pixels) is a weighted mean of
  input pixels under a triangle ("tent") of half-width ``max(1, n_in / n_out)``: linear
  interpolation when enlarging, an anti-aliased (area-like) mean when shrinking. Weights
  that would fall outside the image are dropped and the rest renormalized.
- :class:`RescaledPlane` is a (C, Y', X') view of a (C, Y, X) plane: a slice reads only the
  input rows and columns under its weights, so the engine windows into it and a large image
  still streams. Each pixel is computed from the same weights in the same order whatever
  window it is read in, so tiles of the rescaled image agree exactly where they overlap.
- :class:`RescaleBack` is a tile sink for the rescaled plan: it stitches the class scores of
  each grid row of tiles into a band, resamples the bands it can back to input rows (with
  the same operator, the other way), and hands full-width bands of the input's size to the
  inner sink, with the argmax taken there for labels. Memory is O(tile rows x width).

"Exact" then means: the result equals the argmax, at each input pixel, of one whole-image pass
of the network over the rescaled image (mirror-padded and tiled on its own pooling grid, so
seam-free as always), resampled back by :func:`axis_weights`. It does not depend on the tile
size, the streaming, or the backend's fp32 path.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import sparse

from .errors import TilingError
from .padding import plane_slices
from .plan import Tile, TilePlan
from .sinks import BandSink, TileSink

__all__ = ["RescaleBack", "RescaledPlane", "axis_weights", "band_plan", "scaled_shape"]

BACK_SLICE_PX = 1 << 20  # pixels of the slices RescaleBack hands on (scores: ~12 MB for 3 classes)


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """The (rows, cols) of an image of ``shape`` rescaled by ``factor`` (at least 1 px each).

    >>> scaled_shape((1000, 301), 0.5), scaled_shape((10, 10), 2.25)
    ((500, 150), (22, 22))
    """
    if not (factor > 0 and math.isfinite(factor)):
        raise TilingError(f"a rescale factor must be > 0, got {factor}")
    return (max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor)))


def axis_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """The (n_out, n_in) resampling matrix of one axis; each row sums to 1.

    >>> axis_weights(4, 4).toarray().tolist() == np.eye(4).tolist()
    True
    >>> axis_weights(4, 2).toarray().round(3).tolist()
    [[0.429, 0.429, 0.143, 0.0], [0.0, 0.143, 0.429, 0.429]]
    """
    if n_in < 1 or n_out < 1:
        raise TilingError(f"axis sizes must be >= 1, got {n_in} -> {n_out}")
    ratio = n_in / n_out
    half = max(1.0, ratio)
    centre = (np.arange(n_out) + 0.5) * ratio - 0.5
    lo = np.floor(centre - half).astype(np.int64) + 1
    span = math.ceil(2 * half) + 1
    k = lo[:, None] + np.arange(span)[None, :]
    w = np.clip(1.0 - np.abs(k - centre[:, None]) / half, 0.0, None)
    w[(k < 0) | (k >= n_in)] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    keep = w > 0
    rows = np.broadcast_to(np.arange(n_out)[:, None], k.shape)[keep]
    m = sparse.csr_matrix((w[keep], (rows, k[keep])), shape=(n_out, n_in))
    m.sort_indices()
    return m


def _support(m: sparse.csr_matrix, start: int, stop: int) -> tuple[int, int]:
    """The input range [first, last + 1) that output rows [start, stop) read."""
    cols = m.indices[m.indptr[start] : m.indptr[stop]]
    return int(cols.min()), int(cols.max()) + 1


class RescaledPlane:
    """A (C, Y, X) plane seen at ``shape`` = (Y', X'), float32, computed window by window.

    Supports the slicing :func:`tiling.read_window` uses: ``view[..., rows, cols]`` with unit
    steps (and ``view[:, ::s, ::s]``, read in full-width bands, for a strided sample).

    >>> a = np.arange(24, dtype=np.uint8).reshape(1, 4, 6)
    >>> v = RescaledPlane(a, (4, 6))
    >>> v.shape, bool((v[..., 1:3, 2:5] == a[..., 1:3, 2:5]).all())
    ((1, 4, 6), True)
    """

    def __init__(self, plane: Any, shape: tuple[int, int]) -> None:
        self.plane = plane
        c, h, w = (int(n) for n in plane.shape)
        self.source_shape = (h, w)
        self.shape = (c, int(shape[0]), int(shape[1]))
        self.ndim = 3
        self.dtype = np.dtype(np.float32)
        self.rows = axis_weights(h, self.shape[1])  # (Y', Y)
        self.cols = axis_weights(w, self.shape[2])  # (X', X)

    def __getitem__(self, key: Any) -> npt.NDArray[np.float32]:
        channels, rows, cols = plane_slices(key, "RescaledPlane")
        r0, r1, rstep = rows.indices(self.shape[1])
        c0, c1, cstep = cols.indices(self.shape[2])
        if rstep != 1 or cstep != 1:
            band = max(1, (1 << 22) // max(self.shape[2], 1))
            parts = [
                self._read(channels, a, min(a + band, self.shape[1]), 0, self.shape[2])
                for a in range(0, self.shape[1], band)
            ]
            return np.concatenate(parts, axis=1)[:, r0:r1:rstep, c0:c1:cstep]
        return self._read(channels, r0, max(r0, r1), c0, max(c0, c1))

    def _read(self, channels: slice, r0: int, r1: int, c0: int, c1: int) -> npt.NDArray[np.float32]:
        nc = len(range(*channels.indices(self.shape[0])))
        if r1 <= r0 or c1 <= c0:
            return np.zeros((nc, r1 - r0, c1 - c0), np.float32)
        y0, y1 = _support(self.rows, r0, r1)
        x0, x1 = _support(self.cols, c0, c1)
        raw = np.asarray(self.plane[channels, y0:y1, x0:x1], dtype=np.float64)
        rw, cw = self.rows[r0:r1, y0:y1], self.cols[c0:c1, x0:x1]
        out = np.empty((raw.shape[0], r1 - r0, c1 - c0), np.float32)
        for i, ch in enumerate(raw):
            out[i] = (cw @ (rw @ ch).T).T  # every output pixel: the same weights, the same order
        return out


def band_plan(shape: tuple[int, int], cuts: list[int]) -> TilePlan:
    """A plan of full-width bands of an image of ``shape``: band k is rows [cuts[k], cuts[k+1]).

    >>> [t.dest[0] for t in band_plan((10, 4), [0, 3, 10]).tiles]
    [slice(0, 3, None), slice(3, 10, None)]
    """
    h, w = shape
    if cuts[0] != 0 or cuts[-1] != h or any(b <= a for a, b in itertools.pairwise(cuts)):
        raise TilingError(f"band cuts {cuts} do not partition {h} rows")
    tiles = tuple(
        Tile(
            index=k,
            window=(slice(a, b), slice(0, w)),
            keep=(slice(0, b - a), slice(0, w)),
            dest=(slice(a, b), slice(0, w)),
        )
        for k, (a, b) in enumerate(itertools.pairwise(cuts))
    )
    tallest = max(b - a for a, b in itertools.pairwise(cuts))
    return TilePlan(
        image_shape=(h, w),
        tile_out=(tallest, w),
        tile_in=(tallest, w),
        stride=(tallest, w),
        margin=0,
        period=1,
        grid=(len(tiles), 1),
        tiles=tiles,
    )


class RescaleBack:
    """A tile sink for ``scaled_plan`` (tiles of the rescaled image, class scores (K, th, tw))
    that hands the result at ``shape`` to a sink made for :attr:`plan`: full-width bands of
    labels (uint8 argmax) or, for ``output="probabilities"``, of the resampled scores.

    Use: ``back = RescaleBack(scaled_plan, shape, "labels")``, then ``back.connect(inner)``
    with ``inner`` a sink for ``back.plan``; feed the engine's tiles to ``back``.
    """

    def __init__(
        self, scaled_plan: TilePlan, shape: tuple[int, int], output: Literal["labels", "probabilities"]
    ) -> None:
        if output not in ("labels", "probabilities"):
            raise TilingError(f"output must be labels or probabilities, got {output!r}")
        self.scaled_plan, self.shape, self.output = scaled_plan, (int(shape[0]), int(shape[1])), output
        sh, sw = scaled_plan.image_shape
        self.rows = axis_weights(sh, self.shape[0])  # (Y, Y')
        self.cols = axis_weights(sw, self.shape[1])  # (X, X')
        # after band k of the scaled grid (its rows end at ends[k]), every output row whose
        # weights stop before it is ready
        last_needed = np.array([_support(self.rows, y, y + 1)[1] for y in range(self.shape[0])], np.int64)
        ends = [t.dest[0].stop for t in scaled_plan.tiles[:: scaled_plan.grid[1]]]
        ready = [int(np.searchsorted(last_needed, e, side="right")) for e in ends]
        ready[-1] = self.shape[0]
        self._ready = ready
        # what is ready after a band goes on in slices of at most ~1M pixels: a shrunk image's
        # band is many input rows tall, and its scores K float32 a pixel
        step = max(16, BACK_SLICE_PX // max(self.shape[1], 1))
        cuts = sorted({0, *ready})
        cuts = sorted({*cuts, *(y for a, b in itertools.pairwise(cuts) for y in range(a, b, step))})
        self.plan = band_plan(self.shape, cuts)
        self._inner: TileSink | None = None
        self._bands = BandSink(scaled_plan, np.float32, self._on_band)
        self._buf: npt.NDArray[np.float32] | None = None  # scaled rows [buf0, buf0 + len) kept
        self._buf0 = 0
        self._done = 0  # output rows handed on
        self._next = 0  # next band tile of self.plan
        self._band_k = 0

    def connect(self, inner: TileSink) -> RescaleBack:
        self._inner = inner
        return self

    def add(self, tile: Tile, y: npt.NDArray[Any]) -> None:
        if y.ndim != 3:
            raise TilingError("rescaling back needs the class scores of each tile (engine output probabilities)")
        self._bands.add(tile, y)

    def _on_band(self, band: npt.NDArray[np.float32], y0: int) -> None:
        assert self._inner is not None, "connect() an inner sink first"
        if self._buf is None or self._buf.shape[1] == 0:
            buf, self._buf0 = band, y0
        else:
            buf = np.concatenate([self._buf, band], axis=1)
        stop = self._ready[self._band_k]
        self._band_k += 1
        while self._done < stop:
            tile = self.plan.tiles[self._next]
            a, b = tile.dest[0].start, tile.dest[0].stop
            assert a == self._done and b <= stop
            s0, s1 = _support(self.rows, a, b)
            rw = self.rows[a:b, s0:s1]
            part = buf[:, s0 - self._buf0 : s1 - self._buf0]
            out = np.empty((part.shape[0], b - a, self.shape[1]), np.float32)
            for k, ch in enumerate(part):
                out[k] = (self.cols @ (rw @ ch).T).T
            self._next += 1
            self._done = b
            y_out: npt.NDArray[Any] = out if self.output == "probabilities" else np.argmax(out, axis=0).astype(np.uint8)
            self._inner.add(tile, y_out)
        end = self._buf0 + buf.shape[1]
        keep_from = min(_support(self.rows, self._done, self._done + 1)[0], end) if self._done < self.shape[0] else end
        self._buf = buf[:, keep_from - self._buf0 :]
        self._buf0 = keep_from

    def finish(self) -> Any:
        self._bands.finish()
        assert self._inner is not None
        if self._done != self.shape[0]:
            raise TilingError(f"rescaled tiles ended at output row {self._done} of {self.shape[0]}")
        return self._inner.finish()
