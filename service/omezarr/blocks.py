"""Blocks written into an :class:`~service.omezarr.OmeZarrSink`'s store by other processes.

A cluster run (:mod:`service.cluster`) makes the sink on the client as usual (the temporary
store, its arrays and metadata) and hands each task a :class:`BlockWriter` (picklable: it
holds the zarr arrays, which pickle as their store and path). A task writes its finished
block into every pyramid level whose chunks blocks never share: level 0 always (blocks are
whole chunks), and each coarser level while a block still covers whole chunks there. Those
writes touch only the block's own chunks, so tasks never race and a retried task rewrites
the same bytes. :func:`finish_levels` then builds the coarser levels from the last of those
(one pass over 1/f² of the pixels, on the client), and :meth:`OmeZarrSink.finish` commits.

Every level is what the streamed sink writes: labels are every f-th pixel of level 0; image
levels are means of (f_k / f_k-1)² blocks of level k-1, anchored at row and column 0 (block
origins are multiples of f_k, so a block's means are the image's means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import storage_error
from ..io import ImageHeader
from ..sinks import nearest_rows
from ._pyramid import _Layout, _LevelWriter, _MeanRows, plane_leads

if TYPE_CHECKING:
    from .sink import OmeZarrSink

__all__ = ["BlockWriter", "block_levels", "finish_levels"]

_BAND_ROWS = 1024  # rows of the base level read at once by finish_levels


def block_levels(sink: OmeZarrSink, block: tuple[int, int], grid: tuple[int, int]) -> int:
    """How many levels (from level 0) tasks with blocks of ``block`` = (rows, cols) pixels on
    a ``grid`` of blocks write themselves: those where every block is whole chunks."""
    factors, n = sink.layout.factors, 0
    for k, f in enumerate(factors):
        if k and f % factors[k - 1]:
            break
        chunks = sink.label_arrays[k].chunks[-2:]
        aligned = all(
            count == 1 or (side % f == 0 and (side // f) % c == 0)
            for side, c, count in zip(block, chunks, grid, strict=True)
        )
        if not aligned:
            break
        n = k + 1
    if any(f % factors[n - 1] for f in factors[n:]):  # coarser labels come from level n-1: its factor must divide
        n = 1
    return n


def _mean_chain(rows: npt.NDArray[Any], ratio: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    out: list[npt.NDArray[Any]] = []
    means = _MeanRows(ratio, dtype, out.append)
    means.add(rows)
    means.flush()
    return np.concatenate(out) if len(out) > 1 else out[0]


@dataclass
class BlockWriter:
    """Writes finished blocks of labels (and of the copied image) into levels ``0..levels-1``."""

    header: ImageHeader
    layout: _Layout
    label_arrays: list[Any]
    image_arrays: list[Any]  # empty when the labels go into the input's own store
    levels: int
    _leads: dict[int, tuple[tuple[Any, ...], tuple[Any, ...], bool]] = field(default_factory=dict, repr=False)

    def _lead(self, plane: int) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
        if plane not in self._leads:
            self._leads[plane] = plane_leads(self.layout, self.header, plane)
        return self._leads[plane]

    def write(
        self, plane: int, y0: int, x0: int, labels: npt.NDArray[np.uint8], image: npt.NDArray[Any] | None
    ) -> None:
        """Block ``labels`` (rows, cols) at image pixel (``y0``, ``x0``) of ``plane``; ``image``:
        its (C, rows, cols) pixels, for a new store's copy of the image."""
        label_lead, image_lead, channels = self._lead(plane)
        rows: npt.NDArray[Any] | None = None
        if self.image_arrays:
            assert image is not None
            rows = np.moveaxis(np.asarray(image).astype(self.header.dtype, copy=False), 0, 1)  # (rows, C, cols)
        try:
            for k in range(self.levels):
                f = self.layout.factors[k]
                h, w = self.layout.shapes[k]
                ly, lx = y0 // f, x0 // f
                kept = labels[::f, ::f][: h - ly, : w - lx]
                self.label_arrays[k][(*label_lead, slice(ly, ly + kept.shape[0]), slice(lx, lx + kept.shape[1]))] = kept
                if rows is None:
                    continue
                if k:
                    rows = _mean_chain(rows, f // self.layout.factors[k - 1], self.header.dtype)
                data = rows[: h - ly, :, : w - lx]
                data = np.moveaxis(data, 0, 1) if channels else data[:, 0]
                self.image_arrays[k][(*image_lead, slice(ly, ly + data.shape[-2]), slice(lx, lx + data.shape[-1]))] = (
                    data
                )
        except OSError as e:
            raise storage_error(e, "writing the OME-Zarr output") from None


def finish_levels(sink: OmeZarrSink, levels: int) -> None:
    """Build levels ``levels..`` of every plane from level ``levels - 1`` (written by the
    blocks), in bands of rows, and mark the planes done; the sink can then :meth:`finish`."""
    layout, header = sink.layout, sink.header
    base = levels - 1
    try:
        for index in range(math.prod(header.stack_shape)):
            if levels < len(layout.factors):
                _coarser(sink, index, base)
            sink.done.add(index)
    except OSError as e:
        raise storage_error(e, "writing the OME-Zarr output") from None


def _coarser(sink: OmeZarrSink, index: int, base: int) -> None:
    layout = sink.layout
    label_lead, image_lead, channels = plane_leads(layout, sink.header, index)
    fb = layout.factors[base]
    labels = [
        (layout.factors[k] // fb, _LevelWriter(sink.label_arrays[k], label_lead, layout.shapes[k]))
        for k in range(base + 1, len(layout.factors))
    ]
    image: list[_LevelWriter] = []
    means: list[_MeanRows] = []
    if sink.image_arrays:
        image = [
            _LevelWriter(sink.image_arrays[k], image_lead, layout.shapes[k], channels)
            for k in range(base + 1, len(layout.factors))
        ]

        def feeder(j: int) -> Any:
            def feed(rows: npt.NDArray[Any]) -> None:
                image[j].add(rows)
                if j + 1 < len(means):
                    means[j + 1].add(rows)

            return feed

        for j, k in enumerate(range(base + 1, len(layout.factors))):
            means.append(_MeanRows(layout.factors[k] // layout.factors[k - 1], sink.header.dtype, feeder(j)))
    height = layout.shapes[base][0]
    for y0 in range(0, height, _BAND_ROWS):
        ys = slice(y0, min(y0 + _BAND_ROWS, height))
        band = np.asarray(sink.label_arrays[base][(*label_lead, ys, slice(None))])
        for ratio, writer in labels:
            writer.add(nearest_rows(band, y0, ratio)[0])
        if means:
            rows = np.asarray(sink.image_arrays[base][(*image_lead, ys, slice(None))])
            rows = np.moveaxis(rows, 0, 1) if channels else rows[:, np.newaxis]  # (rows, C, W)
            means[0].add(rows)
    for _, writer in labels:
        writer.flush()
    for mean, writer in zip(means, image, strict=True):
        mean.flush()
        writer.flush()
