"""The sink's pyramid: what it writes (:class:`_Layout`: NGFF axes, level factors and shapes,
physical scale) and how each plane's rows reach every level (:class:`_PlaneWriter`: label levels
by nearest neighbour, image levels by block means, each written in whole chunk rows)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from ome_zarr.format import Format

from ..errors import storage_error
from ..io import ImageHeader
from ..sinks import RowBlocks, nearest_rows, pyramid_factors
from ._metadata import _FORMATS

if TYPE_CHECKING:
    from .sink import OmeZarrSink

__all__ = [
    "_Layout",
    "_LevelWriter",
    "_MeanRows",
    "_PlaneWriter",
    "_factors_of",
    "plane_leads",
]  # private to the package: what sink.py uses

_MEAN_SLAB_PX = 1 << 20  # pixels averaged at once in the image pyramid (float64 scratch: 8 MB)


@dataclass(frozen=True)
class _Layout:
    """What the sink writes: NGFF axes, level factors and shapes, physical scale/translation."""

    version: str
    image_axes: list[dict[str, Any]]  # the image's NGFF axes (t, c, z, y, x order)
    letters: str  # the header letter of each image axis
    order: list[int]  # the header position of each image axis
    factors: list[int]  # y/x factor of each level, 1 first
    shapes: list[tuple[int, int]]  # (y, x) of each level
    scale: dict[str, float]  # level 0, per axis name
    translation: dict[str, float]

    @property
    def fmt(self) -> Format:
        return _FORMATS[self.version]

    def axes(self, labels: bool) -> list[tuple[dict[str, Any], str, int]]:
        """(NGFF axis, header letter, header position) of the image's or the labels' axes (no channel)."""
        every = zip(self.image_axes, self.letters, self.order, strict=True)
        return [(a, letter, i) for a, letter, i in every if not (labels and letter in "CS")]

    def transforms(self, labels: bool, factor: int, centre: bool) -> list[dict[str, Any]]:
        """Scale (and translation) of a level ``factor`` times smaller in y/x; ``centre``: its
        pixels are factor x factor block means (whose centre moves), else every factor-th pixel."""
        scale, shift = [], []
        for axis, letter, _ in self.axes(labels):
            name, f = axis["name"], factor if letter in "YX" else 1
            s = self.scale.get(name, 1.0)
            scale.append(s * f)
            shift.append(self.translation.get(name, 0.0) + (s * (f - 1) / 2 if centre else 0.0))
        out: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if any(shift):
            out.append({"type": "translation", "translation": shift})
        return out


def _factors_of(
    levels: int | None, level_factors: Sequence[int] | None, height: int, width: int, chunk: int
) -> list[int]:
    if level_factors is not None:
        factors = [int(f) for f in level_factors]
        if levels is not None and levels != len(factors):
            raise ValueError(f"levels={levels} but {len(factors)} level factors {factors}")
        if not factors or factors[0] != 1 or any(a >= b for a, b in itertools.pairwise(factors)):
            raise ValueError(f"level factors must start at 1 and increase, got {factors}")
        return factors
    if levels is not None:
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        return [2**k for k in range(levels)]
    return [1, *pyramid_factors(height, width, chunk)]


class _LevelWriter:
    """One array's rows for one plane, written in blocks of whole chunk rows (``lead``: the
    plane's index on the stack axes; rows and columns beyond ``shape`` are dropped). Rows come
    as (rows, W) labels or (rows, C, W) image rows; ``channels``: the array has a channel axis
    (else C is 1 and dropped)."""

    def __init__(self, array: Any, lead: tuple[Any, ...], shape: tuple[int, int], channels: bool | None = None) -> None:
        self.array, self.lead, self.shape, self.channels = array, lead, shape, channels
        self.blocks = RowBlocks(int(array.chunks[-2]), self._write)
        self.rows = 0

    def _write(self, block: npt.NDArray[Any], y0: int) -> None:
        h, w = self.shape
        rows = min(block.shape[0], h - y0)
        if rows <= 0:
            return
        data = block[:rows, ..., :w]
        if self.channels is not None:  # image rows: (rows, C, W) to (C, rows, W), or (rows, W)
            data = np.moveaxis(data, 0, 1) if self.channels else data[:, 0]
        self.array[(*self.lead, slice(y0, y0 + rows), slice(None))] = data
        self.rows = y0 + rows

    def add(self, rows: npt.NDArray[Any]) -> None:
        self.blocks.add(rows)

    def flush(self) -> None:
        self.blocks.flush()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"pyramid level got {self.rows} of {self.shape[0]} rows")


class _MeanRows:
    """Means over ``ratio`` x ``ratio`` blocks (anchored at row and column 0; partial blocks at
    the edges average what they hold) of the (rows, C, W) rows fed in, handed to ``emit``."""

    def __init__(self, ratio: int, dtype: np.dtype[Any], emit: Callable[[npt.NDArray[Any]], None]) -> None:
        self.ratio, self.dtype, self.emit = ratio, dtype, emit
        self._pending: list[npt.NDArray[Any]] = []
        self._held = 0

    def add(self, rows: npt.NDArray[Any]) -> None:
        self._pending.append(rows)
        self._held += rows.shape[0]
        whole = self._held // self.ratio * self.ratio
        if whole:
            held = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._reduce(held[:whole])
            rest = held[whole:]
            self._pending, self._held = ([rest] if len(rest) else []), len(rest)

    def flush(self) -> None:
        if self._held:
            self._reduce(np.concatenate(self._pending))
        self._pending, self._held = [], 0

    def _reduce(self, rows: npt.NDArray[Any]) -> None:
        r = self.ratio
        step = max(r, _MEAN_SLAB_PX // max(rows.shape[1] * rows.shape[2], 1) // r * r)
        cols = np.arange(0, rows.shape[2], r)
        col_n = np.diff(np.append(cols, rows.shape[2]))
        for start in range(0, rows.shape[0], step):
            slab = rows[start : start + step].astype(np.float64)
            starts = np.arange(0, slab.shape[0], r)
            row_n = np.diff(np.append(starts, slab.shape[0]))
            sums = np.add.reduceat(np.add.reduceat(slab, starts, axis=0), cols, axis=2)
            mean = sums / (row_n[:, None, None] * col_n[None, None, :])
            if self.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                mean = np.clip(np.rint(mean), info.min, info.max)
            self.emit(mean.astype(self.dtype))


def plane_leads(layout: _Layout, header: ImageHeader, index: int) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
    """Plane ``index``'s position on the labels' and on the image's leading axes (every axis
    but y, x; the image's channel axis whole), and whether the image has a channel axis."""
    stack = tuple(int(i) for i in np.unravel_index(index, header.stack_shape)) if header.stack_shape else ()
    position = dict(zip(header.stack_indices, stack, strict=True))  # header axis -> this plane's index on it
    label_lead = tuple(position[i] for _, letter, i in layout.axes(labels=True) if letter not in "YX")
    image_lead = tuple(
        slice(None) if letter in "CS" else position[i]
        for _, letter, i in layout.axes(labels=False)
        if letter not in "YX"
    )
    channels = any(letter in "CS" for _, letter, _ in layout.axes(labels=False))
    return label_lead, image_lead, channels


class _PlaneWriter:
    """The bands of one plane's mask (and, for a new store, the image's rows) into every level."""

    def __init__(self, sink: OmeZarrSink, index: int) -> None:
        self.sink, self.index = sink, index
        layout, header = sink.layout, sink.header
        self.height = header.height
        label_lead, image_lead, channels = plane_leads(layout, header, index)
        self.labels = [
            _LevelWriter(a, label_lead, shape) for a, shape in zip(sink.label_arrays, layout.shapes, strict=True)
        ]
        self.image: list[_LevelWriter] = []
        self.means: list[_MeanRows] = []
        self.source: Any = None
        if sink.image is not None:
            self.source = sink.image.plane(index)
            self.image = [
                _LevelWriter(a, image_lead, shape, channels)
                for a, shape in zip(sink.image_arrays, layout.shapes, strict=True)
            ]
            for k in range(1, len(self.image)):
                ratio = layout.factors[k] // layout.factors[k - 1]
                self.means.append(_MeanRows(ratio, header.dtype, self._feeder(k)))
        self.next_row = 0

    def _feeder(self, k: int) -> Callable[[npt.NDArray[Any]], None]:
        def feed(rows: npt.NDArray[Any]) -> None:
            self.image[k].add(rows)
            if k < len(self.means):
                self.means[k].add(rows)

        return feed

    def on_band(self, band: npt.NDArray[Any], y0: int) -> None:
        if self.sink.closed:
            raise RuntimeError("the OME-Zarr output was already finished or aborted")
        if y0 != self.next_row:
            raise RuntimeError(f"band at row {y0}, expected row {self.next_row}")
        try:
            for f, level in zip(self.sink.layout.factors, self.labels, strict=True):
                level.add(band if f == 1 else nearest_rows(band, y0, f)[0])
            if self.source is not None:
                rows = np.asarray(self.source[:, y0 : y0 + band.shape[0], :]).astype(self.sink.header.dtype, copy=False)
                rows = np.moveaxis(rows, 0, 1)  # (rows, C, W): RowBlocks and the means cut along axis 0
                self.image[0].add(rows)
                if self.means:
                    self.means[0].add(rows)
            self.next_row = y0 + band.shape[0]
            if self.next_row >= self.height:
                self._flush()
        except OSError as e:
            raise storage_error(e, "writing the OME-Zarr output") from None

    def _flush(self) -> None:
        for level in self.labels:
            level.flush()
        if self.image:
            self.image[0].flush()
            for k, mean in enumerate(self.means, 1):
                mean.flush()
                self.image[k].flush()
        self.sink.done.add(self.index)
