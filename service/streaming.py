"""Images larger than memory: windowed reads in, band-by-band tiled BigTIFF out.

The in-memory path (:func:`service.io.read_image` + :meth:`Segmenter.segment`) decodes the
whole image and holds the whole mask. This module does neither:

- **Input**: the TIFF is opened as a lazy array (tifffile's zarr store for tiled or striped
  data, a short-lived memory map for uncompressed contiguous data). :class:`PlaneView`
  shows one plane as a (C, Y, X) array-like, so :func:`tiling.read_window` decodes only the
  TIFF tiles/strips that a window touches.
- **Normalization**: fitted once per plane by the checkpoint's own
  :meth:`~unet.Normalization.fit`, whose strided sample (<= 4M px per channel) this view
  reads band by band: memory stays O(band) and the statistics are exactly those of the
  in-memory path, so the two paths give identical masks.
- **Output**: the engine yields tiles in row-major order, so each grid row of tiles
  completes a band of mask rows; bands are cut into 256x256 tiles and handed to
  ``tifffile`` as a tile iterator (zlib-compressed BigTIFF). With ``pyramid=True`` the file
  is a pyramidal OME-TIFF: sub-resolutions (nearest-neighbour, i.e. every 2**k-th label)
  are collected in temporary raw files while the base level streams, then written as
  SubIFDs. Memory is O(tile rows x width), independent of the image height.

Writes are atomic (a temporary file beside the target, renamed at the end).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile

import tiling

from .errors import CorruptImageError, ImageTooLargeError, InputError, NotATiffError, UnsupportedImageError
from .io import ImageHeader, check_magic, check_segments, header_of, series_of
from .segmenter import Segmenter, mark_no_data

__all__ = [
    "DEFAULT_STREAM_ABOVE_MB",
    "OUTPUT_TILE",
    "PlaneView",
    "TiffSource",
    "decoded_bytes",
    "segment_file",
    "should_stream",
]

log = logging.getLogger(__name__)

DEFAULT_STREAM_ABOVE_MB = 256  # decoded input size above which the CLI and jobs stream
OUTPUT_TILE = 256  # tile edge of the streamed output TIFF
_MAX_CHUNK_BYTES = 64 << 20  # a strip/tile larger than this is not worth streaming
_SAMPLE_BAND_PX = 1 << 23  # pixels per band when reading a strided sample


def decoded_bytes(header: ImageHeader) -> int:
    """Bytes the whole image takes once decoded.

    >>> h = ImageHeader((1000, 2000), "YX", np.dtype("uint16"), None, None, None)
    >>> decoded_bytes(h)
    4000000
    """
    return header.pixels * header.dtype.itemsize


def should_stream(
    header: ImageHeader, stream_above_mb: float, *, output: str = "labels", pyramid: bool = False
) -> bool:
    """Whether to take the streamed path: labels output and large input (or a pyramid).

    >>> h = ImageHeader((1000, 2000), "YX", np.dtype("uint8"), None, None, None)
    >>> should_stream(h, 1), should_stream(h, 2), should_stream(h, 0, output="probabilities")
    (True, False, False)
    """
    if output != "labels":
        return False
    return pyramid or decoded_bytes(header) > stream_above_mb * 1e6


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
    """A TIFF opened for windowed reads; use as a context manager.

    ``header`` is what series ``series`` of the file declares (checked like
    :func:`service.io.read_header`, and every strip/tile is checked to lie inside the
    file); :meth:`plane` gives plane ``i`` of the (planes, C, Y, X) layout as a lazy
    :class:`PlaneView`.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_pixels: int | None = None, series: int = 0) -> None:
        self.path = Path(path)
        check_magic(self.path)
        self._store: Any = None
        try:
            with tifffile.TiffFile(self.path) as tif:
                self.header = header_of(tif, max_pixels, series)
                check_segments(tif, series)
                chosen = series_of(tif)[series]
                page = chosen.pages[0]
                offset = chosen.dataoffset
                chunk_bytes = math.prod(page.chunks) * self.header.dtype.itemsize  # type: ignore[union-attr]
                compressed = page.compression != 1  # type: ignore[union-attr]
            if offset is not None and not compressed:
                self.array: Any = _MappedArray(self.path, offset, self.header.shape, self.header.dtype)
            elif chunk_bytes > _MAX_CHUNK_BYTES:
                raise UnsupportedImageError(
                    f"image is stored in compressed strips of {chunk_bytes / 1e6:.0f} MB each; streamed reading "
                    "needs tiled or striped storage (save it with tiles, e.g. tifffile tile=(256, 256))"
                )
            else:
                import zarr  # noqa: PLC0415  (a heavy import, needed only here)

                self._store = tifffile.imread(self.path, aszarr=True, series=series, level=0)
                self.array = zarr.open_array(self._store, mode="r")
        except (NotATiffError, CorruptImageError, ImageTooLargeError, UnsupportedImageError):
            self.close()
            raise
        except Exception as e:
            self.close()
            raise CorruptImageError(f"corrupt TIFF: {e}") from None
        if tuple(self.array.shape) != self.header.shape:
            self.close()
            raise CorruptImageError(f"TIFF store has shape {self.array.shape}, header declares {self.header.shape}")

    @property
    def planes(self) -> int:
        return math.prod(self.header.stack_shape)

    def plane(self, index: int) -> PlaneView:
        return PlaneView(self.array, self.header, index)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> TiffSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlaneView:
    """One plane of a lazy TIFF array, seen as (C, Y, X); slicing decodes only what it needs.

    Supports the basic indexing the engine and :meth:`unet.Normalization.fit` use:
    ``view[..., rows, cols]`` and ``view[:, ::step, ::step]`` (read band by band).
    """

    def __init__(self, array: Any, header: ImageHeader, index: int) -> None:
        self.array, self.header = array, header
        self.shape = (header.channels, header.height, header.width)
        self.ndim = 3
        self.dtype = header.dtype
        stack = header.stack_shape
        self._stack_index = tuple(int(i) for i in np.unravel_index(index, stack)) if stack else ()

    def _read(self, channels: slice, rows: slice, cols: slice) -> npt.NDArray[Any]:
        """Read by axis position (stack letters may repeat: ``QQQYX``), as (C, rows, cols)."""
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
        except Exception as e:
            raise CorruptImageError(f"corrupt TIFF data: {e}") from None
        kept = sorted(i for i in (c, y, x) if i is not None)  # integer-indexed stack axes are gone
        order = [kept.index(i) for i in (c, y, x) if i is not None]
        data = data.transpose(order)
        return data if c is not None else data[np.newaxis]

    def __getitem__(self, key: Any) -> npt.NDArray[Any]:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3 or not all(isinstance(k, slice) for k in key):
            raise TypeError(f"PlaneView supports slices only, got {key!r}")
        channels, rows, cols = key
        start, stop, step = rows.indices(self.shape[1])
        if step == 1 or step < 1:
            return self._read(channels, rows, cols)
        # a strided sample: read bands of whole rows so only one band is decoded at a time
        band = max(step, _SAMPLE_BAND_PX // max(self.shape[2], 1) // step * step)
        parts = [self._read(channels, slice(r, min(r + band, stop), step), cols) for r in range(start, stop, band)]
        return np.concatenate(parts, axis=1) if parts else self._read(channels, rows, cols)


def _label_bands(
    segmenter: Segmenter,
    image: PlaneView | npt.NDArray[Any],
    *,
    tile_size: int,
    stride: int | None,
    progress: Callable[[int], None] | None,
) -> Iterator[npt.NDArray[np.uint8]]:
    """Yield the label mask of one (C, Y, X) plane as consecutive bands of full-width rows.

    Same plan, normalization, predictor and no-data rule (NaN pixels are background:
    :func:`~service.segmenter.mark_no_data`, on each tile's area, read again for float
    images only) as :meth:`Segmenter.segment`, hence the same labels; only one grid row of
    tiles is held at a time.
    """
    affine = segmenter.checkpoint.normalization.fit(image)  # type: ignore[arg-type]  # array-like: one bounded sample
    plan = tiling.plan_tiles(image.shape[-2:], depth=segmenter.depth, tile_size=tile_size, stride=stride)
    floating = np.dtype(image.dtype).kind == "f"
    _, ncols = plan.grid
    band: npt.NDArray[np.uint8] | None = None
    for tile, y in tiling.predict_tiles(
        image, plan, segmenter.predictor.predict_labels, batch_size=segmenter.batch_size, normalize=affine
    ):
        rows, cols = tile.dest
        if tile.index % ncols == 0:
            band = np.empty((rows.stop - rows.start, plan.image_shape[1]), np.uint8)
        assert band is not None
        band[:, cols] = y[tile.keep]
        if floating:
            mark_no_data(band[:, cols], image[:, rows, cols], segmenter.background)
        if progress is not None:
            progress(1)
        if tile.index % ncols == ncols - 1:
            yield band


def _retile(bands: Iterator[npt.NDArray[Any]], width: int, tile: int) -> Iterator[npt.NDArray[Any]]:
    """Cut consecutive full-width bands into (tile, tile) TIFF tiles, row-major; edges zero-padded.

    >>> bands = iter([np.arange(12).reshape(3, 4), np.arange(12, 20).reshape(2, 4)])
    >>> [t.tolist() for t in _retile(bands, 4, 3)][:2]
    [[[0, 1, 2], [4, 5, 6], [8, 9, 10]], [[3, 0, 0], [7, 0, 0], [11, 0, 0]]]
    """
    pending: list[npt.NDArray[Any]] = []
    held = 0

    def cut(rows: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
        for x in range(0, width, tile):
            t = rows[:, x : x + tile]
            if t.shape != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])))
            yield t

    for b in bands:
        pending.append(b)
        held += b.shape[0]
        while held >= tile:
            rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield from cut(rows[:tile])
            rest = rows[tile:]
            pending, held = ([rest] if len(rest) else []), len(rest)
    if held:
        yield from cut(np.concatenate(pending))


class _LevelSink:
    """Every 2**k-th row and column of the streamed mask, appended to a raw temporary file."""

    def __init__(self, directory: Path, factor: int, width: int) -> None:
        self.factor, self.width = factor, len(range(0, width, factor))
        fd, name = tempfile.mkstemp(dir=directory, prefix=".level", suffix=".raw")
        self.path = Path(name)
        self.file = os.fdopen(fd, "w+b")
        self.rows = 0
        self._next = 0  # next full-resolution row index this level keeps

    def add(self, band: npt.NDArray[np.uint8], y0: int) -> None:
        first = self._next - y0
        if first < band.shape[0]:
            kept = np.ascontiguousarray(band[first :: self.factor, :: self.factor])
            self.file.write(kept.tobytes())
            self.rows += kept.shape[0]
            self._next += kept.shape[0] * self.factor

    def bands(self, rows: int = OUTPUT_TILE) -> Iterator[npt.NDArray[np.uint8]]:
        self.file.flush()
        self.file.seek(0)
        for _ in range(0, self.rows, rows):
            data = self.file.read(rows * self.width)
            yield np.frombuffer(data, np.uint8).reshape(-1, self.width)

    def close(self) -> None:
        """Close and delete the file; never raises (a full disk may refuse the final flush of
        bytes that are thrown away anyway, and the file must go regardless)."""
        try:
            self.file.close()
        except OSError as e:
            log.debug("closing a pyramid level file: %s", e)
        finally:
            self.path.unlink(missing_ok=True)


def _pyramid_factors(height: int, width: int, tile: int = OUTPUT_TILE) -> list[int]:
    """Downsampling factors 2, 4, ... until the level fits in one tile.

    >>> _pyramid_factors(1000, 3000), _pyramid_factors(100, 100)
    ([2, 4, 8, 16], [])
    """
    factors, f = [], 2
    while max(height, width) / (f // 2) > tile:
        factors.append(f)
        f *= 2
    return factors


def _physical_metadata(header: ImageHeader) -> dict[str, Any]:
    """OME physical pixel size (µm) from the TIFF resolution, where it has a unit.

    >>> h = ImageHeader((8, 8), "YX", np.dtype("uint8"), (20000.0, 10000.0), 3, None)
    >>> _physical_metadata(h)
    {'PhysicalSizeX': 0.5, 'PhysicalSizeXUnit': 'µm', 'PhysicalSizeY': 1.0, 'PhysicalSizeYUnit': 'µm'}
    """
    per_unit = {2: 25400.0, 3: 10000.0}.get(header.resolution_unit or 0)
    if header.resolution is None or per_unit is None or min(header.resolution) <= 0:
        return {}
    rx, ry = header.resolution
    return {
        "PhysicalSizeX": per_unit / rx,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": per_unit / ry,
        "PhysicalSizeYUnit": "µm",
    }


def _write_streamed(
    target: Path,
    source: TiffSource,
    band_source: Callable[[int], Iterator[npt.NDArray[np.uint8]]],
    *,
    pyramid: bool,
) -> None:
    header = source.header
    h, w = header.height, header.width
    options: dict[str, Any] = {
        "photometric": "minisblack",
        "compression": "zlib",
        "compressionargs": {"level": 6},
        "tile": (OUTPUT_TILE, OUTPUT_TILE),
        # tifffile compresses tiles on worker threads in passes of `buffersize` bytes (default
        # 512 MB of tiles held at once); a few tile rows keep the writer's memory O(width)
        "buffersize": 4 * OUTPUT_TILE * max(w, OUTPUT_TILE),
    }
    if header.resolution is not None:
        options["resolution"] = header.resolution
        options["resolutionunit"] = header.resolution_unit
    if not pyramid:
        shape = (*header.stack_shape, h, w)

        def tiles() -> Iterator[npt.NDArray[Any]]:
            for i in range(source.planes):
                yield from _retile(band_source(i), w, OUTPUT_TILE)

        metadata = {"axes": header.stack_axes + "YX"}
        with tifffile.TiffWriter(target, bigtiff=True) as tif:
            if w == 1 and len(shape) > 2:
                # tifffile drops the trailing 1 of a shaped series and would cut the tiles of a (planes, h)
                # page instead of one per plane: such a mask is planes x h bytes, written whole
                masks = [np.concatenate(list(band_source(i))) for i in range(source.planes)]
                del options["tile"]
                tif.write(np.stack(masks).reshape(shape), metadata=metadata, **options)
            else:
                tif.write(tiles(), shape=shape, dtype=np.uint8, metadata=metadata, **options)
        return
    if source.planes != 1:
        raise UnsupportedImageError(f"--pyramid needs a single 2-D image; this one has axes {header.axes}")
    sinks: list[_LevelSink] = []
    try:
        for f in _pyramid_factors(h, w):  # in the try: a level file that cannot be made leaves none behind
            sinks.append(_LevelSink(target.parent, f, w))

        def base() -> Iterator[npt.NDArray[np.uint8]]:
            y0 = 0
            for band in band_source(0):
                for s in sinks:
                    s.add(band, y0)
                y0 += band.shape[0]
                yield band

        metadata = {"axes": "YX", **_physical_metadata(header)}
        with tifffile.TiffWriter(target, bigtiff=True, ome=True) as tif:
            tif.write(
                _retile(base(), w, OUTPUT_TILE),
                shape=(h, w),
                dtype=np.uint8,
                subifds=len(sinks),
                metadata=metadata,
                **options,
            )
            for s in sinks:
                level_options = dict(options)
                if header.resolution is not None:
                    level_options["resolution"] = tuple(r / s.factor for r in header.resolution)
                tif.write(
                    _retile(s.bands(), s.width, OUTPUT_TILE),
                    shape=(s.rows, s.width),
                    dtype=np.uint8,
                    subfiletype=1,
                    metadata=None,
                    **level_options,
                )
    finally:
        for s in sinks:
            s.close()


def segment_file(
    segmenter: Segmenter,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    tile_size: int = 388,
    stride: int | None = None,
    pyramid: bool = False,
    max_pixels: int | None = None,
    progress: Callable[[int], None] | None = None,
    series: int = 0,
) -> ImageHeader:
    """Segment series ``series`` of a TIFF on disk into a tiled, compressed BigTIFF of
    uint8 labels, streaming.

    ``progress(n)`` is called with the number of tiles just finished; raising from it
    aborts the run and leaves no output. Returns the input's header.
    """
    target = Path(dst)
    if not target.parent.is_dir():
        raise InputError(f"output directory does not exist: {target.parent}")
    with TiffSource(src, max_pixels=max_pixels, series=series) as source:
        segmenter.check(source.header)

        def bands(i: int) -> Iterator[npt.NDArray[np.uint8]]:
            return _label_bands(segmenter, source.plane(i), tile_size=tile_size, stride=stride, progress=progress)

        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
        try:
            _write_streamed(Path(tmp), source, bands, pyramid=pyramid)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return source.header
