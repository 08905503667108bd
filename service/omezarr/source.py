"""The OME-Zarr source: level 0 of an image group's first multiscales, window by window."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from ome_zarr.axes import Axes
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url

from ..errors import CorruptImageError, ImageTooLargeError, InputError, UnsupportedImageError
from ..io import SUPPORTED_DTYPES, ImageHeader, check_axes
from ..sources import PlaneView
from ._metadata import (
    _FORMATS,
    _LETTER,
    _UM_PER_UNIT,
    _level_factors,
    _ngff_version,
    _scale_and_translation,
    _zarr_format,
)

__all__ = ["OmeZarrSource"]

log = logging.getLogger(__name__)


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
