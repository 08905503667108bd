"""OME-Zarr (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3): a source to segment and a sink for labels.

- :func:`is_ome_zarr`: whether a path names a zarr store (a directory holding a zarr group);
- :class:`OmeZarrSource`: level 0 of an image group's first multiscales, read window by window
  (each :meth:`~OmeZarrSource.plane` is a :class:`~service.sources.PlaneView` over the
  level-0 ``zarr.Array``), with its axes, physical scale and pyramid described;
- :class:`OmeZarrSink`: uint8 class labels as ``labels/<name>``, a multiscales pyramid with
  ``image-label`` metadata (colors, class names, source), either in a **new store** that also
  holds a copy of the image (with its own pyramid), or added **into the input's own store**.

Metadata is read with ome-zarr-py's location and validators (:func:`ome_zarr.io.parse_url`,
:class:`ome_zarr.axes.Axes`, ``Format.validate_coordinate_transformations``) and written with
its writers (:func:`ome_zarr.writer.write_multiscales_metadata`,
:func:`ome_zarr.writer.write_label_metadata`). Pixels go through zarr directly: the sink writes
each chunk of every array exactly once, in whole chunk rows as bands of the mask arrive, so
memory stays O(chunk rows x width) per pyramid level and no chunk is read back.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from ome_zarr.axes import Axes
from ome_zarr.format import Format, FormatV04, FormatV05
from ome_zarr.io import parse_url

from tiling import BandSink, TilePlan, TileSink
from unet.atomic import atomic_path

from .errors import CorruptImageError, ImageTooLargeError, InputError, UnsupportedImageError, storage_error
from .io import SUPPORTED_DTYPES, ImageHeader, check_axes
from .sinks import RowBlocks, nearest_rows, pyramid_factors
from .sources import NGFF_VERSIONS, PlaneView, Source, plane_count

with warnings.catch_warnings():  # ome_zarr.writer makes a deprecated Scaler() default argument at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata

__all__ = ["OmeZarrSink", "OmeZarrSource"]

log = logging.getLogger(__name__)

_FORMATS: dict[str, Format] = {"0.4": FormatV04(), "0.5": FormatV05()}
_LETTER = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}  # NGFF axis name -> header letter
_RANK = {"T": 0, "C": 1, "S": 1, "Z": 2, "Y": 3, "X": 4}  # NGFF order: time, channel, space (z, y, x)
_UM_PER_UNIT = {
    "angstrom": 1e-4,
    "picometer": 1e-6,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "decimeter": 1e5,
    "meter": 1e6,
    "inch": 25400.0,
    "foot": 304800.0,
}
_PALETTE = (  # rgb of classes 1, 2, ... (cycled); class `background` is transparent
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)
_LABEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MEAN_SLAB_PX = 1 << 22  # pixels averaged at once in the image pyramid (float64 scratch: 32 MB)


def _zarr_format(path: Path) -> int:
    if (path / "zarr.json").is_file():
        return 3
    if (path / ".zgroup").is_file() or (path / ".zattrs").is_file():
        return 2
    raise CorruptImageError(f"not an OME-Zarr store: {path.name} holds no zarr group (no zarr.json or .zgroup)")


def _ngff_version(path: Path, zarr_format: int, attrs: Mapping[str, Any]) -> str:
    """The NGFF version the image group's metadata declares, refused unless 0.4 on Zarr v2 or 0.5 on v3."""
    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        if "plate" in attrs or "well" in attrs:
            kind = "an HCS plate" if "plate" in attrs else "an HCS well"
            raise UnsupportedImageError(f"{path.name} is {kind}; segment one image of it (a field group)")
        if "bioformats2raw.layout" in attrs:
            raise UnsupportedImageError(
                f"{path.name} is a bioformats2raw collection of images; segment one of them, e.g. {path.name}/0"
            )
        raise UnsupportedImageError(f"{path.name} is a zarr group but not an OME-Zarr image (no multiscales metadata)")
    declared = attrs.get("version") if zarr_format == 3 else multiscales[0].get("version", "0.4")
    if str(declared) != ("0.5" if zarr_format == 3 else "0.4"):
        what = f"OME-Zarr version {declared}" if declared is not None else "no OME-Zarr version"
        raise UnsupportedImageError(
            f"{path.name} declares {what} on Zarr v{zarr_format}; expected 0.4 (Zarr v2) or 0.5 (Zarr v3)"
        )
    return str(declared)


def _scale_and_translation(transforms: Any, ndim: int, where: str) -> tuple[list[float], list[float]]:
    """The ``scale`` and ``translation`` (zeros if absent) of a validated transformation list."""
    scale: list[float] = [1.0] * ndim
    translation: list[float] = [0.0] * ndim
    for t in transforms or []:
        values = t.get("scale") if t.get("type") == "scale" else t.get("translation")
        if t.get("type") not in ("scale", "translation"):
            continue
        if not isinstance(values, list) or len(values) != ndim:
            raise CorruptImageError(f"OME-Zarr {where}: {t.get('type')} {values!r} must list {ndim} numbers")
        numbers = [float(v) for v in values]
        if not all(math.isfinite(v) for v in numbers):
            raise CorruptImageError(f"OME-Zarr {where}: {t.get('type')} {values!r} must be finite")
        if t["type"] == "scale":
            if not all(v > 0 for v in numbers):
                raise CorruptImageError(f"OME-Zarr {where}: scale {values!r} must be positive")
            scale = numbers
        else:
            translation = numbers
    return scale, translation


def _level_factors(shapes: Sequence[tuple[int, int]]) -> list[int] | None:
    """The whole y/x downsampling factor of each level from the (y, x) level shapes, or None
    when some level is no such downsampling of level 0 (anisotropic, or not whole).

    >>> _level_factors([(100, 130), (50, 65), (25, 32)]), _level_factors([(100, 100), (50, 100)])
    ([1, 2, 4], None)
    """
    (h, w), factors = shapes[0], []
    for lh, lw in shapes:
        f = max(1, round(h / max(lh, 1)))
        if round(w / max(lw, 1)) != f or lh not in (h // f, -(-h // f)) or lw not in (w // f, -(-w // f)):
            return None
        factors.append(f)
    return factors if all(a < b for a, b in itertools.pairwise(factors)) else None


class OmeZarrSource:
    """Level 0 of an OME-Zarr image (NGFF 0.4 or 0.5), read window by window; use ``with``.

    Metadata is read with ome-zarr-py's :func:`~ome_zarr.io.parse_url` (format detection, the
    group's OME attributes) and validated with its :class:`~ome_zarr.axes.Axes` and
    ``Format.validate_coordinate_transformations``; the level arrays are opened with
    ``zarr.open_array``. Not :class:`ome_zarr.reader.Reader`: it builds a dask array for
    every level and eagerly descends into every listed label image (one broken label group
    then makes the image unreadable), where segmenting needs one ``zarr.Array`` (faster to
    slice than dask) and the image's own metadata only.

    Attributes: :attr:`header` (axes as letters ``T``/``C``/``Z``/``Y``/``X``; a known
    spatial unit gives the TIFF-style ``resolution`` in pixels per centimetre and the z
    spacing in µm, so TIFF outputs carry it), :attr:`version` (``"0.4"`` or ``"0.5"``),
    :attr:`ngff_axes` (the multiscales axes), :attr:`scale`, :attr:`translation` and
    :attr:`units` per axis name (level 0's transformations followed by the multiscales'
    global ones), :attr:`levels`, :attr:`level_shapes` ((y, x) per level),
    :attr:`level_factors` (whole y/x factors; ``1, 2, 4, ...`` where the levels are no whole
    downsampling), :attr:`chunks_yx`.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_pixels: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            what = "does not exist" if not self.path.exists() else "is not a directory"
            raise CorruptImageError(f"not an OME-Zarr store: {self.path.name} {what}")
        zarr_format = _zarr_format(self.path)
        try:
            location = parse_url(self.path, mode="r", fmt=FormatV05() if zarr_format == 3 else FormatV04())
        except Exception as e:  # zarr raises JSONDecodeError, ValueError, KeyError, ... on broken metadata
            raise CorruptImageError(f"corrupt OME-Zarr metadata in {self.path.name}: {e}") from None
        if location is None:
            raise CorruptImageError(f"corrupt OME-Zarr store: {self.path.name} holds no readable zarr group")
        attrs = location.root_attrs
        self.version = _ngff_version(self.path, zarr_format, attrs)
        self._fmt = _FORMATS[self.version]
        self._store = location.store
        try:
            self._read(attrs["multiscales"][0], max_pixels)
        except InputError:
            raise
        except Exception as e:
            raise CorruptImageError(f"corrupt OME-Zarr metadata in {self.path.name}: {e}") from None

    def _read(self, multiscales: dict[str, Any], max_pixels: int | None) -> None:
        axes = multiscales.get("axes")
        if not isinstance(axes, list) or not axes:
            raise CorruptImageError(f"OME-Zarr multiscales of {self.path.name} has no axes")
        try:
            self.ngff_axes: list[dict[str, Any]] = [dict(a) for a in Axes(axes, fmt=self._fmt).to_list(self._fmt)]
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptImageError(f"invalid OME-Zarr axes {axes!r}: {e}") from None
        names = [str(a.get("name")) for a in self.ngff_axes]
        if len(set(names)) != len(names):
            raise CorruptImageError(f"OME-Zarr axes {names} repeat a name")
        letters = "".join(self._letter(a) for a in self.ngff_axes)
        datasets = multiscales.get("datasets")
        if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
            raise CorruptImageError(f"OME-Zarr multiscales of {self.path.name} lists no datasets")
        ndim = len(names)
        transforms = [d.get("coordinateTransformations") for d in datasets]
        try:
            self._fmt.validate_coordinate_transformations(ndim, len(datasets), transforms)
            if multiscales.get("coordinateTransformations") is not None:
                self._fmt.validate_coordinate_transformations(ndim, 1, [multiscales["coordinateTransformations"]])
        except (ValueError, TypeError, AttributeError, AssertionError) as e:
            raise CorruptImageError(f"invalid OME-Zarr coordinateTransformations: {e}") from None
        s0, t0 = _scale_and_translation(transforms[0], ndim, "dataset 0")
        gs, gt = _scale_and_translation(multiscales.get("coordinateTransformations"), ndim, "multiscales")
        self.scale = {n: g * s for n, g, s in zip(names, gs, s0, strict=True)}
        self.translation = {n: g * t + u for n, g, t, u in zip(names, gs, t0, gt, strict=True)}
        self.units = {str(a["name"]): str(a["unit"]) for a in self.ngff_axes if a.get("unit")}

        arrays = [self._open_level(str(d.get("path", ""))) for d in datasets]
        self._array = arrays[0]
        shape = tuple(int(n) for n in self._array.shape)
        for d, a in zip(datasets, arrays, strict=True):
            if a.ndim != ndim:
                raise CorruptImageError(f"OME-Zarr level {d['path']!r} has {a.ndim} dimensions; the axes are {names}")
        check_axes(letters, shape)
        pixels = math.prod(shape)
        if max_pixels is not None and pixels > max_pixels:
            raise ImageTooLargeError(
                f"image declares {pixels:,} pixels (axes {letters}, shape {shape}); the limit is {max_pixels:,}"
            )
        dtype = np.dtype(self._array.dtype)
        if dtype.name not in SUPPORTED_DTYPES:
            raise UnsupportedImageError(
                f"unsupported pixel type {dtype.name}; expected one of {', '.join(SUPPORTED_DTYPES)}"
            )
        y, x = letters.index("Y"), letters.index("X")
        self.levels = len(arrays)
        self.level_shapes = [(int(a.shape[y]), int(a.shape[x])) for a in arrays]
        factors = _level_factors(self.level_shapes)
        if factors is None:
            log.info("pyramid levels %s are no whole y/x downsampling; labels use factors 2**k", self.level_shapes)
            factors = [2**k for k in range(self.levels)]
        self.level_factors = factors
        self.chunks_yx = (int(self._array.chunks[y]), int(self._array.chunks[x]))
        self._header = ImageHeader(shape, letters, dtype, *self._physical(names[y], names[x], names))

    def _letter(self, axis: Mapping[str, Any]) -> str:
        name, kind = str(axis.get("name")), axis.get("type")
        if kind == "channel" or (name == "c" and kind is None):
            return "C"
        if kind == "time" or (name == "t" and kind is None):
            return "T"
        if name in ("z", "y", "x") and kind in ("space", None):
            return _LETTER[name]
        names = [str(a.get("name")) for a in self.ngff_axes]
        raise UnsupportedImageError(
            f"OME-Zarr axis {name!r} (type {kind!r}) cannot be segmented: expected axes t, c, z, y, x, got {names}"
        )

    def _open_level(self, path: str) -> Any:
        if not path:
            raise CorruptImageError(f"OME-Zarr multiscales of {self.path.name} has a dataset without a path")
        try:
            return zarr.open_array(store=self._store, path=path, mode="r")
        except Exception as e:
            raise CorruptImageError(f"OME-Zarr level {path!r} of {self.path.name} cannot be opened: {e}") from None

    def _physical(
        self, yname: str, xname: str, names: Sequence[str]
    ) -> tuple[tuple[float, float] | None, int | None, float | None]:
        """TIFF-style (x, y) pixels per centimetre and unit 3, and the z spacing in µm, where the unit is known."""

        def um(name: str) -> float | None:
            per = _UM_PER_UNIT.get(self.units.get(name, "").lower())
            return self.scale[name] * per if per is not None else None

        sy, sx = um(yname), um(xname)
        resolution = (1e4 / sx, 1e4 / sy) if sy is not None and sx is not None else None
        spacing = um("z") if "z" in names else None
        return resolution, 3 if resolution is not None else None, spacing

    @property
    def header(self) -> ImageHeader:
        return self._header

    def plane(self, index: int) -> PlaneView:
        return PlaneView(self._array, self._header, index)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> OmeZarrSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class _PlaneWriter:
    """The bands of one plane's mask (and, for a new store, the image's rows) into every level."""

    def __init__(self, sink: OmeZarrSink, index: int) -> None:
        self.sink, self.index = sink, index
        layout, header = sink.layout, sink.header
        self.height = header.height
        stack = tuple(int(i) for i in np.unravel_index(index, header.stack_shape)) if header.stack_shape else ()
        position = dict(zip(header.stack_indices, stack, strict=True))  # header axis -> this plane's index on it
        lead: tuple[Any, ...] = tuple(position[i] for _, letter, i in layout.axes(labels=True) if letter not in "YX")
        self.labels = [_LevelWriter(a, lead, shape) for a, shape in zip(sink.label_arrays, layout.shapes, strict=True)]
        self.image: list[_LevelWriter] = []
        self.means: list[_MeanRows] = []
        self.source: Any = None
        if sink.image is not None:
            self.source = sink.image.plane(index)
            channels = any(letter in "CS" for _, letter, _ in layout.axes(labels=False))
            lead = tuple(
                slice(None) if letter in "CS" else position[i]
                for _, letter, i in layout.axes(labels=False)
                if letter not in "YX"
            )
            self.image = [
                _LevelWriter(a, lead, shape, channels)
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


class _Aborted(Exception):  # noqa: N818  (control flow: handed to the atomic context to discard its tree)
    """What :meth:`OmeZarrSink.abort` hands :func:`~unet.atomic.atomic_path` so it removes the temporary tree."""


class OmeZarrSink:
    """uint8 class labels as ``labels/<name>`` of an OME-Zarr image (see the module docstring).

    ``target``: the new store (a ``.zarr`` directory; written beside it under a temporary
    name and renamed at :meth:`finish`, replacing an existing one then). With ``into`` (the
    input's own store; ``target`` is then None or the same path) the labels are added there:
    refused if ``labels/<name>`` exists; written under a temporary name inside ``labels/``,
    renamed and listed in the labels group at :meth:`finish`; :meth:`abort` (or a failed
    finish) removes them and restores the labels group's metadata files byte for byte. The
    NGFF version, axes, level count and level shapes are then the store's.

    A new store (``version`` ``"0.4"``: Zarr v2, ``"0.5"``: Zarr v3) holds the image, copied
    band by band from ``image`` (same dtype; axes t, c, z, y, x as present: other stack axes
    are refused) with a pyramid whose level k is the mean of (f_k / f_(k-1))² blocks of level
    k-1 (its translation puts each pixel at its block's centre), and ``labels/<name>``.

    Labels: the image's axes without the channel axis, uint8, one level per image level
    (``levels`` / ``level_factors``; default: the OME-Zarr input's, else halving until a level
    fits one chunk); level k is every f_k-th pixel of level 0 (nearest neighbour) with the
    scale times f_k on y/x; ``image-label`` gives each class a color (``background``
    transparent), its name (``class_names``) as the ``class`` property, and ``source``
    ``../../``. Physical scale: ``scale`` per axis name, else the OME-Zarr input's (with its
    units and translation), else the header's µm pixel size and z spacing, else 1.0.

    Chunks: ``chunks`` in y and x, 1 on stack axes, all channels in one; each chunk is written
    once, whole (background-only chunks too), and none is read back.
    """

    def __init__(
        self,
        target: Path | None,
        header: ImageHeader,
        *,
        class_names: Sequence[str],
        version: str | None = None,
        name: str = "unet",
        into: Path | None = None,
        image: Source | None = None,
        levels: int | None = None,
        level_factors: Sequence[int] | None = None,
        scale: Mapping[str, float] | None = None,
        chunks: int = 512,
        background: int = 0,
    ) -> None:
        if not _LABEL_NAME.fullmatch(name):
            raise UnsupportedImageError(
                f"label name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        if not 1 <= len(class_names) <= 256:
            raise ValueError(f"expected 1 to 256 class names for uint8 labels, got {len(class_names)}")
        if chunks < 1:
            raise ValueError(f"chunks must be positive, got {chunks}")
        if into is None and target is None:
            raise ValueError("a target store or into= is needed")
        if into is not None and target is not None and Path(target).resolve() != Path(into).resolve():
            raise ValueError(f"target {target} and into {into} name different stores")
        if into is None and (image is None or image.header.shape != header.shape):
            raise ValueError("a new OME-Zarr store needs the image to copy (image=, of the header's shape)")
        self.header, self.name, self.image = header, name, image if into is None else None
        self.class_names, self.background, self.chunks = list(class_names), background, chunks
        self.planes = plane_count(header)
        self.done: set[int] = set()
        self.image_arrays: list[Any] = []
        self.label_arrays: list[Any] = []
        self._into = Path(into) if into is not None else None
        self._atomic: AbstractContextManager[Path] | None = None
        self._labels_dir: Path | None = None  # into a store: its labels group, and what to restore there
        self._saved: dict[str, bytes | None] = {}
        self._made_labels_dir = self._renamed = False
        self._closed = False
        try:
            if self._into is not None:
                self.layout = self._into_layout(self._into, version, levels, level_factors, scale)
                self._open_into(self._into)
            else:
                assert target is not None
                self.layout = self._new_layout(version or "0.4", levels, level_factors, scale)
                self._open_new(Path(target))
        except OSError as e:
            self.abort()
            raise storage_error(e, "creating the OME-Zarr output") from None
        except BaseException:
            self.abort()
            raise

    # --- layout -------------------------------------------------------------------------

    def _new_layout(
        self, version: str, levels: int | None, level_factors: Sequence[int] | None, scale: Mapping[str, float] | None
    ) -> _Layout:
        if version not in NGFF_VERSIONS:
            raise UnsupportedImageError(f"OME-Zarr version {version!r} cannot be written; expected 0.4 or 0.5")
        header = self.header
        if any(a not in "TZ" for a in header.stack_axes) or len(set(header.stack_axes)) != len(header.stack_axes):
            raise UnsupportedImageError(
                f"an OME-Zarr image has axes t, c, z, y, x (each at most once); this one has axes {header.axes!r} "
                f"of shape {header.shape}: write a TIFF instead"
            )
        order = sorted(range(len(header.axes)), key=lambda i: _RANK[header.axes[i]])
        letters = "".join(header.axes[i] for i in order)
        source = self.image if isinstance(self.image, OmeZarrSource) else None
        if source is not None:
            axes = [dict(source.ngff_axes[i]) for i in order]
            base, translation = dict(source.scale), dict(source.translation)
            if levels is None and level_factors is None:
                level_factors = source.level_factors
        else:
            base, translation, units = {}, {}, {}
            if header.pixel_size_um is not None:
                base["y"], base["x"] = header.pixel_size_um
                units["y"] = units["x"] = "micrometer"
            if header.imagej_spacing is not None and "Z" in header.axes:
                base["z"], units["z"] = float(header.imagej_spacing), "micrometer"
            axes = []
            for letter in letters:
                name = "c" if letter in "CS" else letter.lower()
                axis = {"name": name, "type": {"T": "time", "C": "channel", "S": "channel"}.get(letter, "space")}
                axes.append(axis | ({"unit": units[name]} if name in units else {}))
        factors = _factors_of(levels, level_factors, header.height, header.width, self.chunks)
        if any(b % a for a, b in itertools.pairwise(factors)):  # the image's block means need a chain
            log.info("level factors %s do not divide one another: the new store's pyramid halves", factors)
            factors = [2**k for k in range(len(factors))]
        shapes = [(-(-header.height // f), -(-header.width // f)) for f in factors]
        return _Layout(version, axes, letters, order, factors, shapes, dict(scale or base), translation)

    def _into_layout(
        self,
        store: Path,
        version: str | None,
        levels: int | None,
        level_factors: Sequence[int] | None,
        scale: Mapping[str, float] | None,
    ) -> _Layout:
        with OmeZarrSource(store) as source:
            got, have = (self.header.axes, self.header.shape), (source.header.axes, source.header.shape)
            if got != have:
                raise ValueError(f"header {got} is not that of {store.name} {have}")
            if version is not None and version != source.version:
                raise UnsupportedImageError(
                    f"{store.name} is OME-Zarr {source.version}: labels added to it are {source.version}, not {version}"
                )
            if not source.header.axes.endswith("YX"):
                raise UnsupportedImageError(f"labels can be added to images whose last axes are y, x; got {got[0]}")
            factors = _factors_of(levels, level_factors or source.level_factors, 1, 1, 1)
            if len(factors) != source.levels:
                raise ValueError(f"{store.name} has {source.levels} levels; its labels need as many, got {factors}")
            h, w = self.header.height, self.header.width
            shapes = [
                (min(-(-h // f), lh), min(-(-w // f), lw))
                for f, (lh, lw) in zip(factors, source.level_shapes, strict=True)
            ]
            order = list(range(len(source.ngff_axes)))
            scale = dict(scale or source.scale)
            return _Layout(
                source.version, source.ngff_axes, source.header.axes, order, factors, shapes, scale, source.translation
            )

    # --- stores -------------------------------------------------------------------------

    def _create_levels(self, group: Any, labels: bool, dtype: npt.DTypeLike) -> list[Any]:
        layout, header = self.layout, self.header
        axes = layout.axes(labels)
        options: dict[str, Any] = {"config": {"write_empty_chunks": True}, "fill_value": 0}
        if layout.fmt.zarr_format == 2:
            options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}  # NGFF 0.4: nested chunk keys
        else:
            options["dimension_names"] = [a["name"] for a, _, _ in axes]
        arrays = []
        for k, (h, w) in enumerate(layout.shapes):
            shape = [h if letter == "Y" else w if letter == "X" else header.shape[i] for _, letter, i in axes]
            chunks = [
                min(self.chunks, n) if letter in "YX" else n if letter in "CS" else 1
                for n, (_, letter, _) in zip(shape, axes, strict=True)
            ]
            arrays.append(group.create_array(str(k), shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, **options))
        return arrays

    def _write_multiscales(self, group: Any, labels: bool, name: str, method: str) -> None:
        layout = self.layout
        datasets = [
            {"path": str(k), "coordinateTransformations": layout.transforms(labels, f, centre=not labels)}
            for k, f in enumerate(layout.factors)
        ]
        axes = [a for a, _, _ in layout.axes(labels)]
        write_multiscales_metadata(group, datasets, fmt=layout.fmt, axes=axes, name=name, metadata={"method": method})

    def _label_group(self, group: Any) -> None:
        """The label arrays and their multiscales in ``group`` (``image-label`` comes with the listing)."""
        self.label_arrays = self._create_levels(group, True, np.uint8)
        self._write_multiscales(group, True, self.name, "nearest neighbour: every f-th pixel of level 0")

    def _image_label(self) -> dict[str, Any]:
        colors, properties, n = [], [], 0
        for k, class_name in enumerate(self.class_names):
            rgba = [0, 0, 0, 0]
            if k != self.background:
                rgba, n = [*_PALETTE[n % len(_PALETTE)], 255], n + 1
            colors.append({"label-value": k, "rgba": rgba})
            properties.append({"label-value": k, "class": class_name})
        return {"colors": colors, "properties": properties, "source": {"image": "../../"}}

    def _open_new(self, target: Path) -> None:
        self._atomic = atomic_path(target, directory=True)
        tmp = self._atomic.__enter__()
        fmt = self.layout.fmt
        root = zarr.open_group(str(tmp), mode="w", zarr_format=fmt.zarr_format)
        self.image_arrays = self._create_levels(root, False, self.header.dtype)
        self._write_multiscales(root, False, "image", "local mean of (f_k / f_k-1)^2 blocks of level k-1")
        labels = root.create_group("labels")
        if fmt.version == "0.5":
            add_metadata(labels, {"version": fmt.version}, fmt=fmt)
        self._label_group(labels.create_group(self.name))
        write_label_metadata(labels, self.name, fmt=fmt, **self._image_label())

    def _open_into(self, store: Path) -> None:
        zarr_format = self.layout.fmt.zarr_format
        if (store / ".zmetadata").exists() or "consolidated_metadata" in _json(store / "zarr.json"):
            raise UnsupportedImageError(
                f"{store.name} has consolidated metadata, which labels added to it would leave stale; "
                "write the labels to a new store instead"
            )
        labels_dir = store / "labels"
        if (labels_dir / self.name).exists() or self.name in _labels_list(labels_dir, zarr_format):
            raise UnsupportedImageError(f"labels/{self.name} exists in {store.name}; choose another --label-name")
        meta = [".zattrs", ".zgroup"] if zarr_format == 2 else ["zarr.json"]
        self._saved = {n: (labels_dir / n).read_bytes() if (labels_dir / n).is_file() else None for n in meta}
        self._labels_dir, self._made_labels_dir = labels_dir, not labels_dir.exists()
        labels_dir.mkdir(exist_ok=True)
        self._atomic = atomic_path(labels_dir / self.name, directory=True)
        tmp = self._atomic.__enter__()
        self._label_group(zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format))

    # --- Sink ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Finished or aborted: nothing more may be written."""
        return self._closed

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        if self._closed:
            raise RuntimeError("the OME-Zarr output was already finished or aborted")
        if not 0 <= index < self.planes or index in self.done:
            raise ValueError(f"plane {index} is outside 0..{self.planes - 1} or already written")
        if tuple(plan.image_shape) != (self.header.height, self.header.width):
            raise ValueError(f"plan of {plan.image_shape} for an image of {(self.header.height, self.header.width)}")
        return BandSink(plan, np.uint8, _PlaneWriter(self, index).on_band)

    def finish(self) -> None:
        try:
            if len(self.done) != self.planes:
                raise RuntimeError(f"{self.planes - len(self.done)} of {self.planes} planes were not written")
            self._commit()
        except OSError as e:
            self.abort()
            raise storage_error(e, "writing the OME-Zarr output") from None
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _commit(self) -> None:
        atomic, self._atomic = self._atomic, None
        assert atomic is not None
        if self._labels_dir is None:
            atomic.__exit__(None, None, None)  # .<name>.<random>.part -> the target store
            return
        if (self._labels_dir / self.name).exists():
            atomic.__exit__(_Aborted, _Aborted(), None)
            raise UnsupportedImageError(f"labels/{self.name} appeared meanwhile; choose another --label-name")
        atomic.__exit__(None, None, None)  # labels/.<name>.<random>.part -> labels/<name>
        self._renamed = True
        fmt = self.layout.fmt
        labels = zarr.open_group(str(self._labels_dir), mode="a", zarr_format=fmt.zarr_format)
        if fmt.version == "0.5":
            add_metadata(labels, {"version": fmt.version}, fmt=fmt)
        write_label_metadata(labels, self.name, fmt=fmt, **self._image_label())

    def abort(self) -> None:
        """Remove what was written: a new store's temporary tree; labels being added into a
        store, with its labels group's metadata files restored. Never raises."""
        if self._closed:
            return
        self._closed = True
        atomic, self._atomic = self._atomic, None
        try:
            if atomic is not None:
                atomic.__exit__(_Aborted, _Aborted(), None)  # deletes the temporary tree
        except Exception as e:
            log.warning("removing a partial OME-Zarr output: %s", e)
        if self._labels_dir is not None:
            self._restore(self._labels_dir)

    def _restore(self, labels_dir: Path) -> None:
        try:
            if self._renamed:
                shutil.rmtree(labels_dir / self.name, ignore_errors=True)
            for n, data in self._saved.items():
                if data is None:
                    (labels_dir / n).unlink(missing_ok=True)
                else:
                    (labels_dir / n).write_bytes(data)
            if self._made_labels_dir and labels_dir.is_dir() and not any(labels_dir.iterdir()):
                labels_dir.rmdir()
        except OSError as e:
            log.warning("restoring the labels group of %s: %s", self._into, e)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _labels_list(labels_dir: Path, zarr_format: int) -> list[str]:
    """The ``labels`` list of a labels group, read from its metadata file (empty if none)."""
    attrs = _json(labels_dir / ".zattrs") if zarr_format == 2 else _json(labels_dir / "zarr.json")
    if zarr_format == 3:
        attrs = attrs.get("attributes", {}).get("ome", {})
    listed = attrs.get("labels", []) if isinstance(attrs, dict) else []
    return [str(n) for n in listed] if isinstance(listed, list) else []
