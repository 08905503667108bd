"""``output=instances``: every object its own id, a measurement table and QuPath shapes.

:class:`InstanceSink` is a :class:`~service.sinks.Sink` around the sink that writes the
uint32 instance image (in memory, a streamed TIFF, OME-Zarr). Per plane:

1. the engine's class labels arrive band by band into a :class:`tiling.InstanceLabeller`
   (the rule of :mod:`tiling.instances`), which spools provisional ids (zlib-compressed in a
   temporary file beside the output on streamed routes);
2. once the plane is complete, the final ids are written band by band to the inner sink,
   and each band's objects are measured against the input's rows (read again from the
   source, one band at a time); an object's table row is written as soon as the bands have
   passed it (ids follow the raster order of their first pixel, so complete objects come
   in id order);
3. with a GeoJSON output, each complete object's outline is traced from its bounding box
   (read back from the spool).

Memory stays O(band x width), plus ~25 bytes per provisional object in the labeller and
~50 bytes per object not yet complete in the measurements. Table and GeoJSON are written to
temporary files and renamed at :meth:`InstanceSink.finish`; :meth:`InstanceSink.abort`
leaves nothing behind.

Table columns (:data:`COLUMNS`; ``plane`` first for stacks; per channel ``_c<k>`` suffixes
on the intensity columns for multi-channel images):

- ``id``: the object's value in the instance image;
- ``area_px``; ``area_um2`` when the input has a pixel size;
- ``centroid_y``, ``centroid_x``: mean row and column of its pixels (pixel (r, c) at r, c,
  as :func:`scipy.ndimage.center_of_mass`);
- ``bbox_y0``, ``bbox_x0``, ``bbox_y1``, ``bbox_x1``: its bounding box, ends exclusive;
- ``mean_intensity``, ``max_intensity``, ``integrated_intensity``: the raw input values
  under the object (the sum for ``integrated``), before any normalization.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tiling import BandSink, TilePlan, TileSink
from tiling.instances import InstanceLabeller, InstanceRule, Relabel, Spool, label_instances
from unet import Checkpoint, CheckpointError
from unet.atomic import AtomicTarget

from .errors import InputError, OptionError
from .io import ImageHeader
from .shapes import GeoJsonWriter, feature
from .sinks import ImageSink, ShowsInput

__all__ = [
    "COLUMNS",
    "HoleFillSink",
    "InstanceSink",
    "TableWriter",
    "fill_holes",
    "instance_rule",
    "scaled_rule",
]

COLUMNS = (
    "id",
    "area_px",
    "area_um2",
    "centroid_y",
    "centroid_x",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "mean_intensity",
    "max_intensity",
    "integrated_intensity",
)
_INTENSITY = ("mean_intensity", "max_intensity", "integrated_intensity")
_CSV_ROWS = 8192
_SLICE_PX = 1 << 21  # pixels of the slices of a band the labeller takes at a time (64 rows of 32768)

_FILL_SLICE_PX = _SLICE_PX // 8  # the hole fill's slices: its working arrays stay ~10 MB
BandWriter = Callable[[npt.NDArray[Any], int], None]


def instance_rule(checkpoint: Checkpoint, min_area: int | None = None) -> InstanceRule:
    """The checkpoint's instance rule (its ``instances`` metadata), else: seeds = its foreground
    classes but ``boundary``, growing into ``boundary``; ``min_area`` overrides the minimum.

    >>> from unet.checkpoint import DEMO_CHECKPOINT, load_checkpoint
    >>> instance_rule(load_checkpoint(DEMO_CHECKPOINT), min_area=3).min_area
    3
    """
    names = checkpoint.class_names
    if checkpoint.instances:
        try:
            rule = InstanceRule.from_dict(checkpoint.instances)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's instance rule {checkpoint.instances!r} is invalid: {e}") from None
        bad = [c for c in (*rule.seeds, *rule.grow) if c >= len(names)]
        if bad:
            raise CheckpointError(f"the checkpoint's instance rule names classes {bad}; the model has {len(names)}")
    else:
        grow = tuple(i for i in checkpoint.foreground if names[i] == "boundary")
        rule = InstanceRule(seeds=tuple(i for i in checkpoint.foreground if i not in grow), grow=grow)
    if min_area is not None:
        if min_area < 0:
            raise OptionError(f"min area must be >= 0 px, got {min_area}")
        rule = replace(rule, min_area=min_area)
    return rule


def scaled_rule(rule: InstanceRule, factor: float, *, min_area_given: bool = False) -> InstanceRule:
    """``rule`` (made for the model's scale) for a result mapped back from an image rescaled by
    ``factor`` (rescaled / input): the growth reach and, unless the caller gave it in input
    pixels, the minimum area follow the objects' size.

    >>> scaled_rule(InstanceRule(seeds=(1,), grow=(2,), min_area=20), 0.5)
    InstanceRule(seeds=(1,), grow=(2,), min_area=80, grow_px=8, fill_holes=True)
    """
    if factor == 1.0:
        return rule
    area = rule.min_area if min_area_given else round(rule.min_area / factor**2)
    return replace(rule, min_area=area, grow_px=max(1, math.ceil(rule.grow_px / factor - 1e-9)))


def _columns(channels: int, stack: bool, um2: bool) -> list[str]:
    names = ["plane"] if stack else []
    for c in COLUMNS:
        if c == "area_um2" and not um2:
            continue
        if c in _INTENSITY and channels > 1:
            names += [f"{c}_c{k}" for k in range(channels)]
        else:
            names.append(c)
    return names


class TableWriter:
    """Rows of measurements to ``path``: CSV, or Parquet for a ``.parquet`` suffix (needs pyarrow).

    Written to a temporary file and renamed by :meth:`finish`; :meth:`abort` removes it.
    """

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = Path(path), columns
        self.parquet = self.path.suffix.lower() == ".parquet"
        if self.parquet:
            try:
                import pyarrow  # noqa: F401, PLC0415
            except ImportError:
                raise InputError("a .parquet table needs pyarrow (pip install pyarrow); or write a .csv") from None
        self._atomic = AtomicTarget(self.path)
        self.tmp = self._atomic.path
        self._parquet: Any = None  # a pyarrow.parquet.ParquetWriter once the first rows come
        self._closed = False
        self._file: Any = None
        self._csv: Any = None
        if not self.parquet:
            self._file = open(self.tmp, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._csv = csv.writer(self._file, lineterminator="\n")
            self._csv.writerow(columns)

    def add(self, table: dict[str, npt.NDArray[Any]]) -> None:
        """Append rows (columns of equal length); written at once, one Parquet row group each."""
        if self.parquet:
            import pyarrow as pa  # noqa: PLC0415
            import pyarrow.parquet as pq  # noqa: PLC0415

            piece = pa.table({c: table[c] for c in self.columns})
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.tmp, piece.schema)
            self._parquet.write_table(piece)
            return
        n = len(table["id"])
        for start in range(0, n, _CSV_ROWS):  # a few thousand rows as Python objects at a time
            cols = [table[c][start : start + _CSV_ROWS].tolist() for c in self.columns]
            self._csv.writerows([_fmt(v) for v in row] for row in zip(*cols, strict=True))

    def close(self) -> None:
        """Write what is left and close the temporary file (:meth:`finish` renames it)."""
        if self._closed:
            return
        try:
            if self.parquet:
                if self._parquet is None:  # no objects: an empty table with the columns
                    import pyarrow as pa  # noqa: PLC0415
                    import pyarrow.parquet as pq  # noqa: PLC0415

                    pq.write_table(pa.table({c: pa.array([], pa.float64()) for c in self.columns}), self.tmp)
                else:
                    self._parquet.close()
            else:
                self._file.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def finish(self) -> None:
        self.close()
        self._atomic.commit()

    def abort(self) -> None:
        for f in (self._file, self._parquet):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
        with contextlib.suppress(BaseException):
            self._atomic.discard()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return int(v) if v.is_integer() and abs(v) < 2**53 else f"{v:.6g}"
    return v


class _Measure:
    """Per-object sums over the bands of one plane, kept only for the objects not yet complete.

    Final ids are numbered in raster order of their first pixel and an object's rows are
    contiguous, so once a band is added, every object with an id below the smallest one in
    the band is complete: those are handed to ``done`` as table pieces (columns of equal
    length, ``_ROWS`` objects or more at a time, in id order). Memory: ~48 bytes per object
    between the oldest incomplete one and the newest seen, not per object of the image.

    Every supported input dtype (uint8, uint16, int16, float32) is exact in float32, so the
    maxima are kept in it; sums in float64."""

    _SLICE_PX = 1 << 20  # pixels measured at a time (the temporaries are ~50 bytes a pixel)
    _ROWS = 65536  # complete objects handed over at a time (one Parquet row group)

    def __init__(
        self, count: int, done: Callable[[dict[str, npt.NDArray[Any]]], None], header: ImageHeader, plane: int | None
    ) -> None:
        self.count, self.done, self.header, self.plane = count, done, header, plane
        self.channels = header.channels
        self.base = 1  # the id at index 0 of the arrays
        self.top = 0  # the highest id seen
        self._alloc(1024)

    area: npt.NDArray[np.int64]
    sum_y: npt.NDArray[np.float64]
    sum_x: npt.NDArray[np.float64]
    y0: npt.NDArray[np.int32]
    x0: npt.NDArray[np.int32]
    y1: npt.NDArray[np.int32]
    x1: npt.NDArray[np.int32]
    total: npt.NDArray[np.float64]  # (channels, n)
    peak: npt.NDArray[np.float32]  # (channels, n)
    _BIG = np.iinfo(np.int32).max
    # (name, dtype, value before any pixel, one per channel)
    _FIELDS = (
        ("area", np.int64, 0, False),
        ("sum_y", np.float64, 0, False),
        ("sum_x", np.float64, 0, False),
        ("y0", np.int32, _BIG, False),
        ("x0", np.int32, _BIG, False),
        ("y1", np.int32, 0, False),
        ("x1", np.int32, 0, False),
        ("total", np.float64, 0, True),
        ("peak", np.float32, -np.inf, True),
    )

    def _alloc(self, n: int) -> None:
        for name, dtype, fill, per_channel in self._FIELDS:
            setattr(self, name, np.full((self.channels, n) if per_channel else n, fill, dtype))

    def _reserve(self, top: int) -> None:
        """Room for the ids up to ``top``."""
        n = top - self.base + 1
        if n <= self.area.shape[-1]:
            return
        old = {f[0]: getattr(self, f[0]) for f in self._FIELDS}
        used = self.top - self.base + 1
        self._alloc(max(n, self.area.shape[-1] * 2))
        for f, a in old.items():
            getattr(self, f)[..., :used] = a[..., :used]

    def add(self, ids: npt.NDArray[np.uint32], y0: int, image: npt.NDArray[Any]) -> None:
        """The final ids of rows ``y0...`` and the input's (C, rows, X) values under them."""
        step = max(1, self._SLICE_PX // max(ids.shape[1], 1))
        lowest = self.top + 1
        for r in range(0, len(ids), step):
            lowest = min(lowest, self._add(ids[r : r + step], y0 + r, image[:, r : r + step]))
        if lowest - self.base >= self._ROWS:
            self._flush(lowest)

    def _add(self, ids: npt.NDArray[np.uint32], y0: int, image: npt.NDArray[Any]) -> int:
        """Sum rows ``y0...``; returns the lowest id in them (past the highest seen: none)."""
        flat = ids.ravel()
        where = np.flatnonzero(flat)
        if not len(where):
            return self.top + 1
        order = np.argsort(flat[where], kind="stable")
        where = where[order]  # object pixels, grouped by id
        del order
        obj = flat[where]
        starts = np.flatnonzero(np.r_[True, obj[1:] != obj[:-1]])
        which = obj[starts].astype(np.int64)
        del obj
        self._reserve(int(which[-1]))
        self.top = max(self.top, int(which[-1]))
        at = which - self.base
        ys, xs = np.divmod(where, ids.shape[1])
        sizes = np.diff(np.r_[starts, len(where)])  # pixels of each object in these rows
        self.area[at] += sizes
        self.sum_y[at] += np.add.reduceat(ys, starts) + y0 * sizes
        self.sum_x[at] += np.add.reduceat(xs, starts)
        self.y0[at] = np.minimum(self.y0[at], np.minimum.reduceat(ys, starts) + y0)
        self.y1[at] = np.maximum(self.y1[at], np.maximum.reduceat(ys, starts) + y0 + 1)
        self.x0[at] = np.minimum(self.x0[at], np.minimum.reduceat(xs, starts))
        self.x1[at] = np.maximum(self.x1[at], np.maximum.reduceat(xs, starts) + 1)
        del ys, xs
        for c in range(self.channels):
            v = np.asarray(image[c].ravel()[where], np.float64)
            self.total[c, at] += np.add.reduceat(v, starts)
            self.peak[c, at] = np.maximum(self.peak[c, at], np.maximum.reduceat(v, starts))
        return int(which[0])

    def close(self) -> None:
        """The plane is done: hand over the rest."""
        if self.top != self.count:
            raise AssertionError(f"measured {self.top} of {self.count} objects")  # the labeller's contract
        self._flush(self.count + 1)

    def _flush(self, upto: int) -> None:
        """Hand over the ids ``base..upto-1`` (complete) and drop them from the arrays."""
        k = upto - self.base
        if k <= 0:
            return
        self.done(self._piece(k))
        left = self.top - upto + 1
        for name, _, fill, _ in self._FIELDS:
            a = getattr(self, name)
            a[..., :left] = a[..., k : k + left].copy()
            a[..., left : left + k] = fill
        self.base = upto

    def _piece(self, k: int) -> dict[str, npt.NDArray[Any]]:
        """The table's columns for the first ``k`` ids of the arrays."""
        size = self.header.pixel_size_um
        area = self.area[:k].copy()
        t: dict[str, npt.NDArray[Any]] = {}
        if self.plane is not None:
            t["plane"] = np.full(k, self.plane, np.int64)
        t["id"] = np.arange(self.base, self.base + k, dtype=np.int64)
        t["area_px"] = area
        if size is not None:
            t["area_um2"] = area * (size[0] * size[1])
        t["centroid_y"] = self.sum_y[:k] / area
        t["centroid_x"] = self.sum_x[:k] / area
        t["bbox_y0"], t["bbox_x0"] = self.y0[:k].astype(np.int64), self.x0[:k].astype(np.int64)
        t["bbox_y1"], t["bbox_x1"] = self.y1[:k].astype(np.int64), self.x1[:k].astype(np.int64)
        for c in range(self.channels):
            suffix = f"_c{c}" if self.channels > 1 else ""
            t["mean_intensity" + suffix] = self.total[c, :k] / area
            t["max_intensity" + suffix] = self.peak[c, :k].astype(np.float64)
            t["integrated_intensity" + suffix] = self.total[c, :k].copy()
        return t


@dataclass
class _Plane:
    """One plane's pass 1: class labels in, provisional ids spooled."""

    index: int
    labeller: InstanceLabeller
    bands: BandSink
    owner: InstanceSink

    def add(self, tile: Any, y: npt.NDArray[Any]) -> None:
        self.bands.add(tile, y)

    def finish(self) -> None:
        self.bands.finish()
        self.owner._finish_plane(self.index, self.labeller.finish())


class InstanceSink:
    """Instances of every plane into ``writer(index)`` (the band writer of the sink that holds
    the uint32 image), with an optional ``table`` and ``geojson`` written beside.

    ``source``: the input (its rows are read again for the intensities); ``spool_dir``: where
    the provisional ids go (None: in memory). ``inner``: the image sink, finished or aborted
    with this one. :attr:`count` is the number of objects over all planes.
    """

    def __init__(
        self,
        inner: ImageSink,
        header: ImageHeader,
        rule: InstanceRule,
        source: Any,
        *,
        table: Path | None = None,
        geojson: Path | None = None,
        spool_dir: Path | None = None,
        classification: str = "Nucleus",
    ) -> None:
        self.inner, self.header, self.rule, self.source = inner, header, rule, source
        self.spool_dir, self.classification = spool_dir, classification
        self.count = 0
        self.stack = bool(header.stack_axes)
        self._spools: list[Spool] = []
        self.table: TableWriter | None = None
        self.geojson: GeoJsonWriter | None = None
        try:
            if table is not None:
                columns = _columns(header.channels, self.stack, header.pixel_size_um is not None)
                self.table = TableWriter(table, columns)
            if geojson is not None:
                self.geojson = GeoJsonWriter(geojson)
        except BaseException:
            self.abort()
            raise

    def normalized(self, index: int, affine: Any) -> None:
        """Passed on to the image sink when it shows the input (a preview)."""
        if isinstance(self.inner, ShowsInput):
            self.inner.normalized(index, affine)

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        spool = Spool(self.header.width, self.spool_dir)
        self._spools.append(spool)
        labeller = InstanceLabeller(plan.image_shape, self.rule, spool)
        rows = max(16, _SLICE_PX // max(self.header.width, 1))

        def add(band: npt.NDArray[Any], y0: int) -> None:
            for start in range(0, len(band), rows):  # the labeller's working arrays stay a few MB
                labeller.add(band[start : start + rows])

        return _Plane(index, labeller, BandSink(plan, np.uint8, add), self)

    def _finish_plane(self, index: int, relabel: Relabel) -> None:
        write = self.inner.band_writer(index, np.uint32)
        plane = self.source.plane(index)
        crops = _Crops(relabel) if self.geojson is not None else None

        def done(piece: dict[str, npt.NDArray[Any]]) -> None:
            if self.table is not None:
                self.table.add(piece)
            if crops is not None and self.geojson is not None:  # crops exist for the shapes
                for i, obj in enumerate(piece["id"].tolist()):
                    box = [int(piece[c][i]) for c in ("bbox_y0", "bbox_y1", "bbox_x0", "bbox_x1")]
                    values: dict[str, float] = {"id": obj, "area_px": int(piece["area_px"][i])}
                    if self.stack:
                        values["plane"] = index
                    mask = crops.mask(obj, *box)
                    self.geojson.add(
                        feature(obj, mask, box[0], box[2], classification=self.classification, measurements=values)
                    )

        measure = None
        if self.table is not None or self.geojson is not None:
            stack = index if self.stack else None
            measure = _Measure(relabel.count, done, self.header, stack)
        for y0, ids in relabel.bands():
            write(ids, y0)
            if measure is not None:
                measure.add(ids, y0, np.asarray(plane[..., y0 : y0 + len(ids), :]))
        self.count += relabel.count
        if measure is not None:
            measure.close()
        relabel.spool.close()

    def finish(self) -> None:
        """Everything written and closed first, then the image committed, then the table and
        the shapes renamed into place: a failure anywhere before leaves none of them."""
        sides = [w for w in (self.table, self.geojson) if w is not None]
        try:
            for w in sides:
                w.close()
            self.inner.finish()
        except BaseException:
            self.abort()
            raise
        finally:
            self._close_spools()
        for w in sides:
            w.finish()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self.inner.abort()
        for w in (self.table, self.geojson):
            if w is not None:
                with contextlib.suppress(BaseException):
                    w.abort()
        self._close_spools()

    def _close_spools(self) -> None:
        for s in self._spools:
            s.close()
        self._spools.clear()


class _Crops:
    """Objects' masks read back from the spool, asked for in order of their top row (the
    order of the ids): the decoded chunks under the current box are kept."""

    def __init__(self, relabel: Relabel) -> None:
        self.relabel = relabel
        self.spans = relabel.spool.spans
        self.starts = np.array([y for y, _ in self.spans], np.int64)
        self.cache: dict[int, npt.NDArray[np.uint32]] = {}

    def mask(self, obj: int, y0: int, y1: int, x0: int, x1: int) -> npt.NDArray[np.bool_]:
        """The mask of object ``obj`` in its bounding box (ends exclusive)."""
        cache, spans = self.cache, self.spans
        first = int(np.searchsorted(self.starts, y0, side="right")) - 1
        last = int(np.searchsorted(self.starts, y1 - 1, side="right")) - 1
        for k in [k for k in cache if k < first]:
            del cache[k]
        pieces = []
        for k in range(first, last + 1):
            if k not in cache:
                cache[k] = self.relabel.apply(self.relabel.spool.chunk(k))
            cy0, n = spans[k]
            a, b = max(y0, cy0) - cy0, min(y1, cy0 + n) - cy0
            pieces.append(cache[k][a:b, x0:x1])
        if last - first > 2:  # a tall object: keep only the chunks near its top for the next ones
            for k in [k for k in cache if k > first + 1]:
                del cache[k]
        crop = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        return np.asarray(crop == obj)


def fill_holes(classes: npt.NDArray[Any], rule: InstanceRule) -> npt.NDArray[np.uint8]:
    """What :class:`HoleFillSink` writes, for a whole (Y, X) class mask in memory: each
    background pixel the instance rule fills into an object takes the rule's first seed class.

    >>> c = np.zeros((7, 7), np.uint8); c[1:6, 1:6] = 1; c[3, 3] = 0
    >>> int(fill_holes(c, InstanceRule(seeds=(1,)))[3, 3])
    1
    """
    out = np.array(classes, np.uint8)
    holes = (out == 0) & (label_instances(out, replace(rule, fill_holes=True)) > 0)
    out[holes] = rule.seeds[0]
    return out


class _Rows:
    """Rows of a :class:`Spool` read back in order, ``take(n)`` at a time."""

    def __init__(self, spool: Spool) -> None:
        self.chunks = spool.chunks()
        self.buf: npt.NDArray[np.uint32] | None = None

    def take(self, n: int) -> npt.NDArray[np.uint32]:
        parts, have = [], 0
        while have < n:
            if self.buf is None or not len(self.buf):
                self.buf = next(self.chunks)[1]
            piece = self.buf[: n - have]
            self.buf = self.buf[len(piece) :]
            parts.append(piece)
            have += len(piece)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class _FillPlane:
    index: int
    labeller: InstanceLabeller
    classes: Spool
    bands: BandSink
    owner: HoleFillSink

    def add(self, tile: Any, y: npt.NDArray[Any]) -> None:
        self.bands.add(tile, y)

    def finish(self) -> None:
        self.bands.finish()
        self.owner._finish_plane(self.index, self.labeller.finish(), self.classes)


class HoleFillSink:
    """Class labels with the holes of their objects filled, into the sink ``inner`` (uint8).

    The objects are those of ``rule`` (the instance rule: one hole inside one nucleus is
    filled, a gap enclosed by several touching nuclei is not); each background region the
    rule fills into an object (it does not touch the image border and borders only that
    object) takes the class ``fill`` (the rule's first seed class: ``nucleus``). Every other
    pixel keeps its class. Two passes per plane as :class:`InstanceSink`, with the class
    labels spooled beside the provisional ids, so memory stays O(band x width).
    """

    def __init__(
        self, inner: ImageSink, header: ImageHeader, rule: InstanceRule, *, spool_dir: Path | None = None
    ) -> None:
        self.inner, self.header, self.rule, self.spool_dir = inner, header, replace(rule, fill_holes=True), spool_dir
        self.fill = np.uint8(rule.seeds[0])
        self.filled = 0  # pixels filled, all planes
        self._spools: list[Spool] = []

    def normalized(self, index: int, affine: Any) -> None:
        if isinstance(self.inner, ShowsInput):
            self.inner.normalized(index, affine)

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        ids, classes = Spool(self.header.width, self.spool_dir), Spool(self.header.width, self.spool_dir)
        self._spools += [ids, classes]
        labeller = InstanceLabeller(plan.image_shape, self.rule, ids)
        rows = max(16, _FILL_SLICE_PX // max(self.header.width, 1))  # labels stream in less memory than instances

        def add(band: npt.NDArray[Any], y0: int) -> None:
            for start in range(0, len(band), rows):
                piece = band[start : start + rows]
                labeller.add(piece)
                classes.write(piece.astype(np.uint32))

        return _FillPlane(index, labeller, classes, BandSink(plan, np.uint8, add), self)

    def _finish_plane(self, index: int, relabel: Relabel, classes: Spool) -> None:
        write = self.inner.band_writer(index, np.uint8)
        rows = _Rows(classes)
        for y0, ids in relabel.bands():
            c = rows.take(len(ids)).astype(np.uint8)
            holes = (c == 0) & (ids > 0)
            if holes.any():
                c[holes] = self.fill
                self.filled += int(holes.sum())
            write(c, y0)
        relabel.spool.close()
        classes.close()

    def finish(self) -> None:
        try:
            self.inner.finish()
        except BaseException:
            self.abort()
            raise
        finally:
            self._close_spools()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self.inner.abort()
        self._close_spools()

    def _close_spools(self) -> None:
        for s in self._spools:
            s.close()
        self._spools.clear()
