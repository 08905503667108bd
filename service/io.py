"""Reading and writing TIFF images with tifffile, defensively.

Everything about a file is decided from its header before a pixel is decoded: the
declared size against the limit (a 134-byte file can claim 60000 x 60000 pixels, and
tifffile allocates what the header declares), the dtype, the axes, and that every strip
or tile lies inside the file (a truncated file is refused, not decoded as zeros).

Images are handed on as (planes, C, Y, X). Axes are told apart by **position**, not by
letter: the one ``Y`` and the one ``X`` are the image, the (single) ``C`` or ``S`` axis
(samples, e.g. RGB) holds the channels, and every other axis is a stack axis (Z, T, Q,
I, ... and repeated letters such as ``QQQ``), segmented plane by plane. The output
holds the stack axes in the input's order followed by ``YX`` (probabilities: the
classes as ``C`` before ``YX``): for the usual files, whose Y and X come last, that is
the input's shape and axes without the channel axis. Axes that cannot be read this
way (no Y or X, a repeated Y, X, C or S, both C and S, letters other than A-Z) are
refused, naming them.

A file may hold several series (an OME-TIFF with two images, a TIFF with a thumbnail);
one is segmented, ``series=0`` unless asked for, and the header says how many there
are. Pyramid levels of one series are not series.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import tifffile

from .errors import CorruptImageError, ImageTooLargeError, NotATiffError, UnsupportedImageError

__all__ = [
    "GEOTIFF_TAGS",
    "SUPPORTED_DTYPES",
    "ImageData",
    "ImageHeader",
    "check_axes",
    "check_magic",
    "check_segments",
    "encode_tiff",
    "geotiff_tags",
    "header_of",
    "read_header",
    "series_of",
    "to_planes",
    "write_tiff",
]

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class ImageHeader:
    """What the file declares, read without decoding pixels."""

    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype[Any]
    resolution: tuple[float, float] | None  # (x, y) pixels per unit
    resolution_unit: int | None  # TIFF ResolutionUnit: 1 none, 2 inch, 3 centimeter
    imagej_spacing: float | None  # z spacing from ImageJ metadata, carried to the output
    series: int = 0  # which of the file's series this is
    series_count: int = 1  # how many series the file holds (pyramid levels not counted)
    geotiff: tuple[tuple[int, int, int, Any, bool], ...] = ()  # GeoTIFF tags, as tifffile's extratags

    @property
    def channel_axis(self) -> str | None:
        return next((a for a in "CS" if a in self.axes), None)

    @property
    def channel_index(self) -> int | None:
        """Position of the channel axis (``C`` or ``S``) in :attr:`axes`, if there is one."""
        c = self.channel_axis
        return self.axes.index(c) if c else None

    @property
    def stack_indices(self) -> tuple[int, ...]:
        """Positions of the stack axes: every axis but Y, X and the channel axis.

        >>> ImageHeader((2, 3, 4, 5, 6), "QQCYX", np.dtype("uint8"), None, None, None).stack_indices
        (0, 1)
        """
        skip = {self.axes.index("Y"), self.axes.index("X"), self.channel_index}
        return tuple(i for i in range(len(self.axes)) if i not in skip)

    @property
    def stack_axes(self) -> str:
        return "".join(self.axes[i] for i in self.stack_indices)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[i] for i in self.stack_indices)

    @property
    def height(self) -> int:
        return self.shape[self.axes.index("Y")]

    @property
    def width(self) -> int:
        return self.shape[self.axes.index("X")]

    @property
    def channels(self) -> int:
        c = self.channel_index
        return self.shape[c] if c is not None else 1

    @property
    def pixels(self) -> int:
        return math.prod(self.shape)

    @property
    def pixel_size_um(self) -> tuple[float, float] | None:
        """(y, x) pixel size in µm, where the resolution has a unit (inch or centimetre).

        >>> ImageHeader((8, 8), "YX", np.dtype("uint8"), (20000.0, 10000.0), 3, None).pixel_size_um
        (1.0, 0.5)
        """
        per_unit = {2: 25400.0, 3: 10000.0}.get(self.resolution_unit or 0)
        if self.resolution is None or per_unit is None or min(self.resolution) <= 0:
            return None
        rx, ry = self.resolution
        return per_unit / ry, per_unit / rx


@dataclass(frozen=True)
class ImageData:
    header: ImageHeader
    planes: npt.NDArray[Any]  # (planes, C, Y, X)


def _source(src: str | os.PathLike[str] | bytes | BinaryIO) -> Any:  # path or binary file object
    return io.BytesIO(src) if isinstance(src, bytes | bytearray | memoryview) else src


def check_magic(src: Any) -> None:
    if isinstance(src, str | os.PathLike):
        with open(src, "rb") as f:
            head = f.read(4)
    else:
        pos = src.tell()
        head = src.read(4)
        src.seek(pos)
    if head not in _TIFF_MAGICS:
        raise NotATiffError(f"not a TIFF file (starts with {head!r}); expected a TIFF image (II*/MM* header)")


def check_axes(axes: str, shape: tuple[int, ...]) -> None:
    """Refuse axes that cannot be read as stack axes + one optional channel axis + Y + X.

    >>> check_axes("QQQYX", (2, 2, 2, 16, 16))
    >>> check_axes("CYXS", (2, 16, 16, 3))
    Traceback (most recent call last):
    ...
    service.errors.UnsupportedImageError: expected at most one channel axis (C or S), got axes 'CYXS' of shape (2, 16, 16, 3)
    """
    where = f"axes {axes!a} of shape {shape}"
    if len(axes) != len(shape):
        raise CorruptImageError(f"TIFF declares {where}: one axis letter per dimension expected")
    if not all("A" <= a <= "Z" for a in axes):
        raise UnsupportedImageError(f"expected axis letters A-Z, got {where}")
    if axes.count("Y") != 1 or axes.count("X") != 1:
        raise UnsupportedImageError(f"expected exactly one Y and one X axis, got {where}")
    if axes.count("C") + axes.count("S") > 1:
        raise UnsupportedImageError(f"expected at most one channel axis (C or S), got {where}")
    if 0 in shape:
        raise UnsupportedImageError(f"image has no pixels: {where}")


def series_of(tif: tifffile.TiffFile) -> list[tifffile.TiffPageSeries]:
    """``tif.series``, after walking the IFD chain once.

    tifffile stops a circular IFD chain (an IFD pointing back to an earlier one) when it
    lists the pages, where ``series`` alone loops over it forever: a 298-byte upload held a
    worker and its slot, and flooded the log. Every access to a file's series goes here.
    """
    len(tif.pages)
    return list(tif.series)


# ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams,
# GeoAsciiParams, GDAL_NODATA: where the image lies on the Earth, carried into every TIFF output
GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42113)


def geotiff_tags(page: Any) -> tuple[tuple[int, int, int, Any, bool], ...]:
    """A page's GeoTIFF tags as tifffile's ``extratags`` (code, type, count, value, write once)."""
    out = []
    for code in GEOTIFF_TAGS:
        tag = page.tags.get(code)
        if tag is None:
            continue
        value = tag.value
        if isinstance(value, np.ndarray):
            value = tuple(value.tolist())
        count = len(value) if isinstance(value, tuple | list) else 1
        out.append((code, int(tag.dtype), count, value, True))
    return tuple(out)


def header_of(tif: tifffile.TiffFile, max_pixels: int | None, series: int = 0) -> ImageHeader:
    """The header of series ``series`` of an open file, checked (no pixel decoded)."""
    every = series_of(tif)
    count = len(every)
    if not count:
        raise CorruptImageError("TIFF holds no image series")
    if not 0 <= series < count:
        raise UnsupportedImageError(f"series {series} does not exist: the file holds {count} series (0..{count - 1})")
    chosen = every[series]
    axes, shape = str(chosen.axes), tuple(int(n) for n in chosen.shape)
    check_axes(axes, shape)
    page = chosen.pages[0] if chosen.pages else None
    if page is None:
        raise CorruptImageError("TIFF series has no readable first page")
    pixels = math.prod(shape)
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"image declares {pixels:,} pixels (axes {axes}, shape {shape}); the limit is {max_pixels:,}"
        )
    dtype = np.dtype(chosen.dtype) if chosen.dtype is not None else None
    if dtype is None or dtype.name not in SUPPORTED_DTYPES:
        raise UnsupportedImageError(
            f"unsupported pixel type {getattr(dtype, 'name', dtype)}; expected one of {', '.join(SUPPORTED_DTYPES)}"
        )
    resolution: tuple[float, float] | None = None
    unit: int | None = None
    if isinstance(page, tifffile.TiffPage) and "XResolution" in page.tags and "YResolution" in page.tags:
        try:
            rx, ry = page.get_resolution()
            resolution, unit = (float(rx), float(ry)), int(tifffile.RESUNIT(int(page.resolutionunit)))
            if not all(math.isfinite(r) and r > 0 for r in resolution):
                resolution, unit = None, None
        except (ValueError, ZeroDivisionError, TypeError, OverflowError):
            # a resolution the output could not carry (unit 34049, 0/0, inf): dropped, not fatal
            resolution, unit = None, None
    spacing = None
    if tif.imagej_metadata and "spacing" in tif.imagej_metadata:
        spacing = float(tif.imagej_metadata["spacing"])
    geo = geotiff_tags(page) if isinstance(page, tifffile.TiffPage) else ()
    return ImageHeader(shape, axes, dtype, resolution, unit, spacing, series, count, geo)


def check_segments(tif: tifffile.TiffFile, series: int = 0) -> None:
    """Refuse a file whose strips/tiles point past its end (a truncated upload)."""
    size = tif.filehandle.size
    for page in series_of(tif)[series].pages:
        if page is None:
            raise CorruptImageError("TIFF page could not be read (truncated or corrupt)")
        for off, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            if count and off + count > size:
                raise CorruptImageError(
                    f"TIFF is truncated: image data runs to byte {off + count:,} but the file has {size:,} bytes"
                )


def read_header(
    src: str | os.PathLike[str] | bytes | BinaryIO, *, max_pixels: int | None = None, series: int = 0
) -> ImageHeader:
    """Read and check what series ``series`` of a TIFF declares, without decoding a pixel."""
    source = _source(src)
    check_magic(source)
    try:
        with tifffile.TiffFile(source) as tif:
            return header_of(tif, max_pixels, series)
    except (NotATiffError, CorruptImageError, ImageTooLargeError, UnsupportedImageError):
        raise
    except Exception as e:  # tifffile raises TiffFileError, struct.error, ValueError, ...
        raise CorruptImageError(f"corrupt TIFF: {e}") from None


def to_planes(data: npt.NDArray[Any], header: ImageHeader) -> npt.NDArray[Any]:
    """Reorder any axes to (planes, C, Y, X) by position (a view where possible).

    >>> h = ImageHeader((2, 3, 4, 5), "QXQY", np.dtype("uint8"), None, None, None)
    >>> a = np.arange(120).reshape(2, 3, 4, 5)
    >>> p = to_planes(a, h)
    >>> p.shape, bool(p[1 * 4 + 2, 0, 3, 1] == a[1, 1, 2, 3])
    ((8, 1, 5, 3), True)
    """
    axes = header.axes
    order = list(header.stack_indices)
    if header.channel_index is not None:
        order.append(header.channel_index)
    order += [axes.index("Y"), axes.index("X")]
    arr = data.reshape(header.shape).transpose(order)
    return arr.reshape(-1, header.channels, header.height, header.width)


def _output_layout(header: ImageHeader, result: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], str]:
    """Restore the stack axes on a (planes, [K,] Y, X) result."""
    stack = header.stack_shape
    if result.ndim == 3:  # labels
        return result.reshape(*stack, header.height, header.width), header.stack_axes + "YX"
    k = result.shape[1]
    return result.reshape(*stack, k, header.height, header.width), header.stack_axes + "CYX"


def write_tiff(target: Any, header: ImageHeader, result: npt.NDArray[Any]) -> None:
    """Write a (planes, [K,] Y, X) result as one compressed TIFF with the input's stack axes, resolution
    and georeferencing (GeoTIFF tags)."""
    data, axes = _output_layout(header, result)
    kwargs: dict[str, Any] = {}
    if header.resolution is not None:
        kwargs["resolution"] = header.resolution
        kwargs["resolutionunit"] = header.resolution_unit
    metadata: dict[str, Any] = {"axes": axes}
    if header.geotiff:
        kwargs["extratags"] = header.geotiff
    big = data.nbytes > 2**32 - 2**25
    tifffile.imwrite(
        target,
        data,
        bigtiff=big,
        photometric="minisblack",
        compression="zlib",
        compressionargs={"level": 6},
        metadata=metadata,
        **kwargs,
    )


def encode_tiff(header: ImageHeader, result: npt.NDArray[Any]) -> bytes:
    """The result as compressed TIFF bytes, with the input's stack axes and resolution."""
    buf = io.BytesIO()
    write_tiff(buf, header, result)
    return buf.getvalue()
