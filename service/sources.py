"""Sources of pixels: what the pipeline reads tile windows from.

A source has the :class:`~service.io.ImageHeader` of its image and gives each plane of the
(planes, C, Y, X) layout as a (C, Y, X) array-like that :func:`tiling.read_window` and
:meth:`unet.Normalization.fit` slice (numpy, or a lazy view that decodes only what a slice
touches). Sources here:

- :class:`ArraySource`: any numpy or dask array (or zarr array) with its axes;
- :class:`TiffSource`: a TIFF/BigTIFF parsed **once** (header, segment and compression
  checks), then decoded whole (:meth:`TiffSource.decoded`) or read window by window
  (:meth:`TiffSource.windowed`: tifffile's zarr store for tiled or striped data, a
  short-lived memory map for uncompressed contiguous data);
- :class:`service.omezarr.OmeZarrSource`: level 0 of an OME-Zarr image, window by window.
"""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import numpy.typing as npt
import tifffile

from tiling.padding import plane_slices

from .errors import CorruptImageError, ImageTooLargeError, InputError, UnsupportedImageError
from .io import ImageData, ImageHeader, check_axes, check_magic, check_segments, header_of, series_of, to_planes

__all__ = [
    "NGFF_VERSIONS",
    "ArraySource",
    "PlaneView",
    "Source",
    "TiffSource",
    "is_ome_zarr",
    "plane_count",
    "read_image",
]

log = logging.getLogger(__name__)

NGFF_VERSIONS = ("0.4", "0.5")  # OME-Zarr: 0.4 on Zarr v2, 0.5 on Zarr v3
_MAX_CHUNK_BYTES = 64 << 20  # a compressed strip/tile larger than this is not worth windowed reads
_SAMPLE_BAND_PX = 1 << 23  # pixels per band when reading a strided sample


def is_ome_zarr(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a zarr store: a directory holding a zarr group (``.zgroup`` or
    ``.zattrs`` of Zarr v2, ``zarr.json`` of Zarr v3), or any path ending ``.zarr`` (so that a
    missing or broken store is told as such by :class:`OmeZarrSource`, not as a bad TIFF).

    >>> is_ome_zarr("scan.ome.zarr"), is_ome_zarr("scan.tif")
    (True, False)
    """
    p = Path(path)
    if p.suffix.lower() == ".zarr":
        return True
    return p.is_dir() and any((p / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs"))


class Source(Protocol):
    """An image the pipeline reads from, plane by plane."""

    @property
    def header(self) -> ImageHeader: ...

    def plane(self, index: int) -> Any:
        """Plane ``index`` of the (planes, C, Y, X) layout as a (C, Y, X) array-like."""

    def close(self) -> None: ...


def plane_count(header: ImageHeader) -> int:
    return math.prod(header.stack_shape)


class PlaneView:
    """One plane of a lazy N-D array (TIFF store, zarr, dask), seen as (C, Y, X).

    Axes are told apart by position as in :mod:`service.io` (stack letters may repeat:
    ``QQQYX``). Supports the basic indexing the engine and :meth:`unet.Normalization.fit`
    use: ``view[..., rows, cols]`` and ``view[:, ::step, ::step]`` (a strided sample, read in
    bands of whole rows so only one band is decoded at a time).
    """

    def __init__(self, array: Any, header: ImageHeader, index: int) -> None:
        self.array, self.header = array, header
        self.shape = (header.channels, header.height, header.width)
        self.ndim = 3
        self.dtype = header.dtype
        stack = header.stack_shape
        self._stack_index = tuple(int(i) for i in np.unravel_index(index, stack)) if stack else ()

    def _read(self, channels: slice, rows: slice, cols: slice) -> npt.NDArray[Any]:
        header = self.header
        y, x, c = header.axes.index("Y"), header.axes.index("X"), header.channel_index
        key: list[Any] = [0] * len(header.axes)
        for i, n in zip(header.stack_indices, self._stack_index, strict=True):
            key[i] = n
        key[y], key[x] = rows, cols
        if c is not None:
            key[c] = channels
        try:
            data = np.asarray(self.array[tuple(key)])
        except FileNotFoundError as e:  # not the data's fault: the file (or a zarr chunk's) went away
            raise InputError(f"the input was moved or deleted while it was read: {e}") from None
        except Exception as e:
            raise CorruptImageError(f"corrupt image data: {e}") from None
        kept = sorted(i for i in (c, y, x) if i is not None)  # integer-indexed stack axes are gone
        order = [kept.index(i) for i in (c, y, x) if i is not None]
        data = data.transpose(order)
        return data if c is not None else data[np.newaxis]

    def __getitem__(self, key: Any) -> npt.NDArray[Any]:
        channels, rows, cols = plane_slices(key, "PlaneView")
        start, stop, step = rows.indices(self.shape[1])
        if step == 1 or step < 1:
            return self._read(channels, rows, cols)
        band = max(step, _SAMPLE_BAND_PX // max(self.shape[2], 1) // step * step)
        parts = [self._read(channels, slice(r, min(r + band, stop), step), cols) for r in range(start, stop, band)]
        return np.concatenate(parts, axis=1) if parts else self._read(channels, rows, cols)


class ArraySource:
    """Any numpy, dask or zarr array with its ``axes`` (e.g. ``"YX"``, ``"CYX"``, ``"ZYX"``).

    >>> src = ArraySource(np.zeros((3, 16, 20), np.uint8), "ZYX")
    >>> src.header.stack_shape, src.plane(2).shape
    ((3,), (1, 16, 20))
    """

    def __init__(self, array: Any, axes: str, *, header: ImageHeader | None = None) -> None:
        shape = tuple(int(n) for n in array.shape)
        check_axes(axes, shape)
        self.array = array
        self._header = header or ImageHeader(shape, axes, np.dtype(array.dtype), None, None, None)
        self._planes = to_planes(array, self._header) if isinstance(array, np.ndarray) else None

    @classmethod
    def of(cls, image: ImageData) -> ArraySource:
        """A decoded image (planes, C, Y, X) as a source."""
        source = cls.__new__(cls)
        source.array, source._header, source._planes = image.planes, image.header, image.planes
        return source

    @property
    def header(self) -> ImageHeader:
        return self._header

    def plane(self, index: int) -> Any:
        if self._planes is not None:
            return self._planes[index]
        return PlaneView(self.array, self._header, index)

    def __enter__(self) -> ArraySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class _MappedArray:
    """Uncompressed contiguous image data, read through a memory map made per read.

    The map is dropped after each read, so touched pages do not pile up in the RSS.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.ndim = len(shape)

    def __getitem__(self, key: Any) -> npt.NDArray[Any]:
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        try:
            return np.array(mm[key])
        finally:
            del mm


class TiffSource:
    """A TIFF opened and checked once; use as a context manager.

    Opening parses the header of series ``series`` (refused past ``max_pixels``), checks
    that every strip/tile lies inside the file, and collects the series' compression
    codes (:attr:`compressions`, for admission). Then :meth:`decoded` (decode it all: the
    fastest for what fits in memory) or :meth:`windowed` (decode only what each window
    touches) gives the pixels, from the same open file.
    """

    def __init__(
        self, src: str | os.PathLike[str] | BinaryIO, *, max_pixels: int | None = None, series: int = 0
    ) -> None:
        self.path = Path(src) if isinstance(src, str | os.PathLike) else None
        check_magic(src)
        self._store: Any = None
        self._array: Any = None
        self._planes: npt.NDArray[Any] | None = None
        try:
            self.tif = tifffile.TiffFile(src)
        except Exception as e:
            raise CorruptImageError(f"corrupt TIFF: {e}") from None
        try:
            self._header = header_of(self.tif, max_pixels, series)
            check_segments(self.tif, series)
            self.series = series_of(self.tif)[series]
            self.compressions = frozenset(
                {int(p.compression) for p in self.series.pages if isinstance(p, tifffile.TiffPage)}
                | {int(self.series.keyframe.compression)}
            )
        except InputError:
            self.close()
            raise
        except Exception as e:  # tifffile raises TiffFileError, struct.error, ValueError, ...
            self.close()
            raise CorruptImageError(f"corrupt TIFF: {e}") from None

    @property
    def header(self) -> ImageHeader:
        return self._header

    @property
    def pyramid_levels(self) -> int:
        """Resolution levels the file holds for this series (1: no pyramid)."""
        return len(self.series.levels)

    def decoded(self) -> TiffSource:
        """Decode the whole series now (planes are then numpy views)."""
        if self._planes is None:
            try:
                data = self.series.asarray()
            except MemoryError:
                raise ImageTooLargeError(
                    f"not enough memory to decode the image ({self.header.pixels:,} pixels)"
                ) from None
            except Exception as e:
                raise CorruptImageError(f"corrupt TIFF: {e}") from None
            self._planes = to_planes(data, self.header)
        return self

    def windowed(self) -> TiffSource:
        """Read windows from the file from now on; decodes nothing yet."""
        if self._array is not None or self._planes is not None:
            return self
        page = self.series.pages[0]
        offset = self.series.dataoffset
        compressed = page.compression != 1  # type: ignore[union-attr]
        if offset is not None and not compressed and self.path is not None:
            self._array = _MappedArray(self.path, offset, self.header.shape, self.header.dtype)
            return self
        chunk_bytes = math.prod(page.chunks) * self.header.dtype.itemsize  # type: ignore[union-attr]
        if chunk_bytes > _MAX_CHUNK_BYTES:
            raise UnsupportedImageError(
                f"image is stored in compressed strips of {chunk_bytes / 1e6:.0f} MB each; streamed reading "
                "needs tiled or striped storage (save it with tiles, e.g. tifffile tile=(256, 256))"
            )
        import zarr  # noqa: PLC0415  (a heavy import, needed only here)

        try:
            self._store = self.series.aszarr(level=0, read_only=True)
            self._array = zarr.open_array(self._store, mode="r")
        except Exception as e:
            raise CorruptImageError(f"corrupt TIFF: {e}") from None
        if tuple(self._array.shape) != self.header.shape:
            raise CorruptImageError(f"TIFF store has shape {self._array.shape}, header declares {self.header.shape}")
        return self

    def plane(self, index: int) -> Any:
        if self._planes is not None:
            return self._planes[index]
        if self._array is None:
            self.windowed()
        return PlaneView(self._array, self.header, index)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._planes = None
        self.tif.close()

    def __enter__(self) -> TiffSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_image(
    src: str | os.PathLike[str] | bytes | BinaryIO, *, max_pixels: int | None = None, series: int = 0
) -> ImageData:
    """Series ``series`` of a TIFF decoded as (planes, C, Y, X), after checking its header and segments."""
    with TiffSource(io.BytesIO(src) if isinstance(src, bytes) else src, max_pixels=max_pixels, series=series) as tiff:
        planes = tiff.decoded()._planes
        assert planes is not None
        return ImageData(tiff.header, planes)
