"""Reading and writing TIFF images with tifffile, defensively.

Everything about a file is decided from its header before a pixel is decoded: the
declared size against the limit (a 134-byte file can claim 60000 x 60000 pixels, and
tifffile allocates what the header declares), the dtype, the axes, and that every strip
or tile lies inside the file (a truncated file is refused, not decoded as zeros).

Images are handed on as (planes, C, Y, X): channel axes are ``C`` or ``S`` (samples,
e.g. RGB), ``Y``/``X`` are the image, every other axis (Z, T, Q, ...) is a stack axis
segmented plane by plane and restored in the output.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import tifffile

from .errors import CorruptImageError, ImageTooLargeError, NotATiffError, UnsupportedImageError

__all__ = [
    "SUPPORTED_DTYPES",
    "ImageData",
    "ImageHeader",
    "check_magic",
    "check_segments",
    "encode_tiff",
    "header_of",
    "read_header",
    "read_image",
    "write_tiff_atomic",
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

    @property
    def channel_axis(self) -> str | None:
        return next((a for a in "CS" if a in self.axes), None)

    @property
    def stack_axes(self) -> str:
        return "".join(a for a in self.axes if a not in "YXCS")

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(n for a, n in zip(self.axes, self.shape, strict=True) if a in self.stack_axes)

    @property
    def height(self) -> int:
        return self.shape[self.axes.index("Y")]

    @property
    def width(self) -> int:
        return self.shape[self.axes.index("X")]

    @property
    def channels(self) -> int:
        c = self.channel_axis
        return self.shape[self.axes.index(c)] if c else 1

    @property
    def pixels(self) -> int:
        return math.prod(self.shape)


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


def header_of(tif: tifffile.TiffFile, max_pixels: int | None) -> ImageHeader:
    if not tif.series:
        raise CorruptImageError("TIFF holds no image series")
    series = tif.series[0]
    axes, shape = series.axes, tuple(int(n) for n in series.shape)
    if "Y" not in axes or "X" not in axes:
        raise UnsupportedImageError(f"expected an image with Y and X axes, got axes {axes!r} of shape {shape}")
    if "C" in axes and "S" in axes:
        raise UnsupportedImageError(f"expected one channel axis, got both C and S in axes {axes!r}")
    page = series.pages[0] if series.pages else None
    if page is None:
        raise CorruptImageError("TIFF series has no readable first page")
    pixels = math.prod(shape)
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"image declares {pixels:,} pixels (axes {axes}, shape {shape}); the limit is {max_pixels:,}"
        )
    dtype = np.dtype(series.dtype) if series.dtype is not None else None
    if dtype is None or dtype.name not in SUPPORTED_DTYPES:
        raise UnsupportedImageError(
            f"unsupported pixel type {getattr(dtype, 'name', dtype)}; expected one of {', '.join(SUPPORTED_DTYPES)}"
        )
    resolution: tuple[float, float] | None = None
    unit: int | None = None
    if isinstance(page, tifffile.TiffPage) and "XResolution" in page.tags and "YResolution" in page.tags:
        try:
            rx, ry = page.get_resolution()
            resolution, unit = (float(rx), float(ry)), int(page.resolutionunit)
        except (ValueError, ZeroDivisionError, TypeError):
            resolution = None
    spacing = None
    if tif.imagej_metadata and "spacing" in tif.imagej_metadata:
        spacing = float(tif.imagej_metadata["spacing"])
    return ImageHeader(shape, axes, dtype, resolution, unit, spacing)


def check_segments(tif: tifffile.TiffFile) -> None:
    """Refuse a file whose strips/tiles point past its end (a truncated upload)."""
    size = tif.filehandle.size
    for page in tif.series[0].pages:
        if page is None:
            raise CorruptImageError("TIFF page could not be read (truncated or corrupt)")
        for off, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            if count and off + count > size:
                raise CorruptImageError(
                    f"TIFF is truncated: image data runs to byte {off + count:,} but the file has {size:,} bytes"
                )


def read_header(src: str | os.PathLike[str] | bytes | BinaryIO, *, max_pixels: int | None = None) -> ImageHeader:
    """Read and check what a TIFF declares, without decoding a pixel."""
    source = _source(src)
    check_magic(source)
    try:
        with tifffile.TiffFile(source) as tif:
            return header_of(tif, max_pixels)
    except (NotATiffError, CorruptImageError, ImageTooLargeError, UnsupportedImageError):
        raise
    except Exception as e:  # tifffile raises TiffFileError, struct.error, ValueError, ...
        raise CorruptImageError(f"corrupt TIFF: {e}") from None


def read_image(src: str | os.PathLike[str] | bytes | BinaryIO, *, max_pixels: int | None = None) -> ImageData:
    """Read a TIFF as (planes, C, Y, X) after checking its header and segments."""
    source = _source(src)
    check_magic(source)
    try:
        with tifffile.TiffFile(source) as tif:
            header = header_of(tif, max_pixels)
            check_segments(tif)
            data = tif.series[0].asarray()
    except (NotATiffError, CorruptImageError, ImageTooLargeError, UnsupportedImageError):
        raise
    except MemoryError:
        raise ImageTooLargeError(f"not enough memory to decode the image ({header.pixels:,} pixels)") from None
    except Exception as e:
        raise CorruptImageError(f"corrupt TIFF: {e}") from None
    return ImageData(header, _to_planes(data, header))


def _to_planes(data: npt.NDArray[Any], header: ImageHeader) -> npt.NDArray[Any]:
    """Reorder any axes to (planes, C, Y, X) (a view where possible)."""
    axes = header.axes
    order = [axes.index(a) for a in header.stack_axes]
    if header.channel_axis:
        order.append(axes.index(header.channel_axis))
    order += [axes.index("Y"), axes.index("X")]
    arr = data.transpose(order)
    return arr.reshape(-1, header.channels, header.height, header.width)


def _output_layout(header: ImageHeader, result: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], str]:
    """Restore the stack axes on a (planes, [K,] Y, X) result."""
    stack = header.stack_shape
    if result.ndim == 3:  # labels
        return result.reshape(*stack, header.height, header.width), header.stack_axes + "YX"
    k = result.shape[1]
    return result.reshape(*stack, k, header.height, header.width), header.stack_axes + "CYX"


def _write(target: Any, header: ImageHeader, result: npt.NDArray[Any]) -> None:
    data, axes = _output_layout(header, result)
    kwargs: dict[str, Any] = {}
    if header.resolution is not None:
        kwargs["resolution"] = header.resolution
        kwargs["resolutionunit"] = header.resolution_unit
    metadata: dict[str, Any] = {"axes": axes}
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
    _write(buf, header, result)
    return buf.getvalue()


def write_tiff_atomic(path: str | os.PathLike[str], header: ImageHeader, result: npt.NDArray[Any]) -> None:
    """Write to a temporary file beside ``path`` and rename it: no partial output, ever."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        _write(tmp, header, result)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
