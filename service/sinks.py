"""Sinks for labels and probabilities: where the pipeline puts what the engine computes.

One protocol (:class:`Sink`): the pipeline asks for each plane's tile sink with
``plane(i, plan)`` (a :class:`tiling.TileSink`: ``add(tile, y)`` in the plan's order, then
``finish()``), and ends with :meth:`Sink.finish` (the output is complete: commit it) or, on
any error or cancel, :meth:`Sink.abort` (nothing is left behind). Sinks here:

- :class:`MemorySink`: the whole result in memory, (planes, Y, X) labels or
  (planes, K, Y, X) probabilities; then one TIFF (:meth:`MemorySink.encode`, or written
  atomically to ``target``);
- :class:`TiledTiffSink`: uint8 labels streamed band by band into a tiled, zlib-compressed
  BigTIFF (256x256 tiles) with the input's stack axes;
- :class:`PyramidTiffSink`: the same as a pyramidal OME-TIFF: sub-resolutions
  (nearest-neighbour, every 2**k-th label) are collected in temporary raw files while the
  base level streams, then written as SubIFDs;
- :class:`service.omezarr.OmeZarrSink`: OME-Zarr labels.

The TIFF writers run tifffile on a writer thread fed through a bounded queue (tifffile
pulls tiles from an iterator; the engine pushes them), so memory stays O(tile rows x
width) and compression overlaps the next tiles' inference. Files are written to a
temporary path beside the target and renamed at the end (:func:`unet.atomic.atomic_path`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import tifffile

from tiling import ArraySink, BandSink, TilePlan, TileSink
from unet import ChannelAffine
from unet.atomic import AtomicTarget, atomic_path

from .errors import UnsupportedImageError
from .io import ImageHeader, encode_tiff, write_tiff

__all__ = [
    "OUTPUT_TILE",
    "BandWriter",
    "ImageSink",
    "MemorySink",
    "PyramidTiffSink",
    "RowBlocks",
    "ShowsInput",
    "Sink",
    "TiledTiffSink",
    "nearest_rows",
    "physical_metadata",
    "pyramid_factors",
]

log = logging.getLogger(__name__)

OUTPUT_TILE = 256  # tile edge of the streamed output TIFF
BandWriter = Callable[[npt.NDArray[Any], int], None]  # (whole-width band, its first row), top to bottom


class Sink(Protocol):
    """Where one image's result goes."""

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        """The tile sink of plane ``index`` (planes come in order, each once)."""

    def finish(self) -> None:
        """Every plane is complete: commit the output."""

    def abort(self) -> None:
        """Something failed or was cancelled: remove whatever was written. Never raises."""


@runtime_checkable
class ShowsInput(Protocol):
    """A sink that shows the input (a preview): :func:`service.pipeline.segment` tells it
    each plane's fitted normalization before the plane's first tile."""

    def normalized(self, index: int, affine: ChannelAffine) -> None: ...


class ImageSink(Sink, Protocol):
    """A sink that writes an image, which also takes whole-width bands (what a sink that
    computes its image from the labels, :class:`~service.instances.InstanceSink`, writes into)."""

    def band_writer(self, index: int, dtype: npt.DTypeLike) -> BandWriter:
        """Instead of :meth:`plane`: where plane ``index``'s whole-width bands of ``dtype`` go, in order."""


class RowBlocks:
    """Regroup consecutive full-width bands into blocks of exactly ``rows`` rows (the last
    block of an image may be shorter), for writers whose chunks or tiles have that height.

    >>> got = []
    >>> blocks = RowBlocks(4, lambda b, y0: got.append((y0, b.shape[0])))
    >>> blocks.add(np.zeros((3, 2))); blocks.add(np.zeros((6, 2))); blocks.flush()
    >>> got
    [(0, 4), (4, 4), (8, 1)]
    """

    def __init__(self, rows: int, emit: Callable[[npt.NDArray[Any], int], None]) -> None:
        self.rows, self.emit = rows, emit
        self._pending: list[npt.NDArray[Any]] = []
        self._held = 0
        self._y0 = 0  # first row of the next block

    def add(self, band: npt.NDArray[Any]) -> None:
        self._pending.append(band)
        self._held += band.shape[0]
        while self._held >= self.rows:
            rows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self.emit(rows[: self.rows], self._y0)
            self._y0 += self.rows
            rest = rows[self.rows :]
            self._pending, self._held = ([rest] if len(rest) else []), len(rest)

    def flush(self) -> None:
        if self._held:
            self.emit(np.concatenate(self._pending), self._y0)
            self._y0 += self._held
        self._pending, self._held = [], 0


def nearest_rows(band: npt.NDArray[Any], y0: int, factor: int) -> tuple[npt.NDArray[Any], int]:
    """The rows and columns of ``band`` (image rows ``y0...``) that a level ``factor`` times
    smaller keeps (every ``factor``-th, nearest-neighbour), and the first one's level row.

    >>> b = np.arange(20).reshape(5, 4)
    >>> kept, ly = nearest_rows(b, 3, 2)
    >>> kept.tolist(), ly
    ([[4, 6], [12, 14]], 2)
    """
    first = (-y0) % factor
    return np.ascontiguousarray(band[first::factor, ::factor]), (y0 + first) // factor


def pyramid_factors(height: int, width: int, tile: int = OUTPUT_TILE) -> list[int]:
    """Downsampling factors 2, 4, ... until the level fits in one tile.

    >>> pyramid_factors(1000, 3000), pyramid_factors(100, 100)
    ([2, 4, 8, 16], [])
    """
    factors, f = [], 2
    while max(height, width) / (f // 2) > tile:
        factors.append(f)
        f *= 2
    return factors


class MemorySink:
    """The whole result in memory: (planes, Y, X) uint8 labels, uint32 instances or
    (planes, K, Y, X) float32 probabilities (``classes`` = K). :meth:`finish` writes it to
    ``target`` (atomically), if one is given; :meth:`encode` gives the TIFF bytes."""

    def __init__(self, header: ImageHeader, output: str, classes: int, target: Path | None = None) -> None:
        planes = math.prod(header.stack_shape)
        lead = (classes,) if output == "probabilities" else ()
        self.header, self.target = header, target
        dtype = {"probabilities": np.float32, "instances": np.uint32}.get(output, np.uint8)
        self.result: npt.NDArray[Any] = np.empty((planes, *lead, header.height, header.width), dtype)

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        return ArraySink(plan.image_shape, self.result.dtype, out=self.result[index])

    def band_writer(self, index: int, dtype: npt.DTypeLike) -> BandWriter:
        """Where whole-width bands of plane ``index`` go, ``(band, first row)``."""
        out = self.result[index]

        def write(band: npt.NDArray[Any], y0: int) -> None:
            out[y0 : y0 + len(band)] = band

        return write

    def finish(self) -> None:
        if self.target is not None:
            with atomic_path(self.target) as tmp:
                write_tiff(tmp, self.header, self.result)

    def abort(self) -> None:
        pass

    def encode(self) -> bytes:
        return encode_tiff(self.header, self.result)


class _Aborted(Exception):  # noqa: N818  (control flow: tells the writer thread to give up)
    """Raised inside the writer thread's tile iterator when the pipeline aborts."""


_END, _ABORT = object(), object()


class _WriterThread:
    """Runs ``consume(items)`` on a thread; :meth:`put` feeds ``items`` through a bounded
    queue. An error in the consumer is raised by the next :meth:`put` or :meth:`close`."""

    def __init__(self, consume: Callable[[Iterator[Any]], None], depth: int = 2) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._consume = consume
        self._thread = threading.Thread(target=self._main, name="tiff-writer", daemon=True)
        self._thread.start()

    def _items(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            yield item

    def _main(self) -> None:
        try:
            self._consume(self._items())
        except BaseException as e:  # handed to the pipeline's thread
            self._error = e

    def _raise(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise self._error

    def put(self, item: Any) -> None:
        while True:
            self._raise()
            if not self._thread.is_alive():
                raise RuntimeError("the TIFF writer stopped before the image was complete")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Wait for the consumer to finish; raises its error."""
        while self._thread.is_alive():
            try:
                self._queue.put(_END, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_ABORT)
        self._thread.join()


def _plane_tiles(bands: Iterator[npt.NDArray[Any]], height: int, width: int, tile: int) -> Iterator[npt.NDArray[Any]]:
    """Cut the ``height`` rows of one plane, taken from ``bands``, into (tile, tile) tiles,
    row-major; edges zero-padded."""
    blocks: list[npt.NDArray[Any]] = []
    cutter = RowBlocks(tile, lambda rows, y0: blocks.append(rows))
    rows = 0
    while rows < height:
        band = next(bands)
        rows += band.shape[0]
        cutter.add(band)
        if rows >= height:
            cutter.flush()
        for block in blocks:
            for x in range(0, width, tile):
                t = block[:, x : x + tile]
                if t.shape != (tile, tile):
                    t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])))
                yield t
        blocks.clear()


def _tiff_options(header: ImageHeader, width: int) -> dict[str, Any]:
    options: dict[str, Any] = {
        "photometric": "minisblack",
        "compression": "zlib",
        "compressionargs": {"level": 6},
        "tile": (OUTPUT_TILE, OUTPUT_TILE),
        # tifffile compresses tiles on worker threads in passes of `buffersize` bytes (default
        # 512 MB of tiles held at once); a few tile rows keep the writer's memory O(width)
        "buffersize": 4 * OUTPUT_TILE * max(width, OUTPUT_TILE),
    }
    if header.resolution is not None:
        options["resolution"] = header.resolution
        options["resolutionunit"] = header.resolution_unit
    if header.geotiff:  # the full-resolution image's georeferencing (not the pyramid's sub-levels)
        options["extratags"] = header.geotiff
    return options


class _StreamedTiff:
    """What the two streamed TIFF sinks share: a temporary file, a writer thread, bands in.

    A subclass makes ``consume(bands)`` (the tifffile writer) and calls :meth:`start`.
    """

    def __init__(self, target: Path, dtype: npt.DTypeLike = np.uint8) -> None:
        self.dtype = np.dtype(dtype)
        self._atomic = AtomicTarget(target)
        self.tmp = self._atomic.path
        self._writer: _WriterThread | None = None

    def start(self, consume: Callable[[Iterator[Any]], None]) -> None:
        self._writer = _WriterThread(consume)

    def put(self, band: npt.NDArray[Any], y0: int) -> None:
        assert self._writer is not None
        self._writer.put(band)

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        return BandSink(plan, self.dtype, self.put)

    def band_writer(self, index: int, dtype: npt.DTypeLike) -> BandWriter:
        """Where whole-width bands of plane ``index`` go, ``(band, first row)``, in order."""
        if np.dtype(dtype) != self.dtype:
            raise ValueError(f"this TIFF holds {self.dtype}, not {np.dtype(dtype)}")
        return self.put

    def finish(self) -> None:
        assert self._writer is not None
        try:
            self._writer.close()
        except BaseException:
            self._atomic.discard()
            raise
        self._atomic.commit()

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.abort()
        finally:
            self._atomic.discard()


class TiledTiffSink(_StreamedTiff):
    """uint8 labels (or ``dtype``: uint32 instances) streamed into a tiled, compressed BigTIFF
    at ``target`` (atomically)."""

    def __init__(self, target: Path, header: ImageHeader, dtype: npt.DTypeLike = np.uint8) -> None:
        self.header = header
        h, w = header.height, header.width
        shape = (*header.stack_shape, h, w)
        options = _tiff_options(header, w)
        metadata = {"axes": header.stack_axes + "YX"}
        planes = math.prod(header.stack_shape)
        super().__init__(target, dtype)
        tmp, dtype = self.tmp, self.dtype

        def consume(bands: Iterator[npt.NDArray[Any]]) -> None:
            with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
                if w == 1 and len(shape) > 2:
                    # tifffile drops the trailing 1 of a shaped series and would cut the tiles of a (planes, h)
                    # page instead of one per plane: such a mask is planes x h bytes, written whole
                    masks = np.concatenate(list(bands))
                    del options["tile"]
                    tif.write(masks.reshape(shape), metadata=metadata, **options)
                    return

                def tiles() -> Iterator[npt.NDArray[Any]]:
                    for _ in range(planes):
                        yield from _plane_tiles(bands, h, w, OUTPUT_TILE)

                tif.write(tiles(), shape=shape, dtype=dtype, metadata=metadata, **options)

        self.start(consume)


class _LevelFile:
    """Every 2**k-th row and column of the streamed mask, appended to a raw temporary file."""

    def __init__(self, directory: Path, factor: int, width: int, dtype: npt.DTypeLike = np.uint8) -> None:
        self.factor, self.width = factor, len(range(0, width, factor))
        self.dtype = np.dtype(dtype)
        fd, name = tempfile.mkstemp(dir=directory, prefix=".level", suffix=".raw")
        self.path = Path(name)
        self.file = os.fdopen(fd, "w+b")
        self.rows = 0

    def add(self, band: npt.NDArray[Any], y0: int) -> None:
        kept, _ = nearest_rows(band, y0, self.factor)
        self.file.write(kept.astype(self.dtype, copy=False).tobytes())
        self.rows += kept.shape[0]

    def bands(self, rows: int = OUTPUT_TILE) -> Iterator[npt.NDArray[Any]]:
        self.file.flush()
        self.file.seek(0)
        for _ in range(0, self.rows, rows):
            data = self.file.read(rows * self.width * self.dtype.itemsize)
            yield np.frombuffer(data, self.dtype).reshape(-1, self.width)

    def close(self) -> None:
        """Close and delete the file; never raises (a full disk may refuse the final flush of
        bytes that are thrown away anyway, and the file must go regardless)."""
        try:
            self.file.close()
        except OSError as e:
            log.debug("closing a pyramid level file: %s", e)
        finally:
            self.path.unlink(missing_ok=True)


def physical_metadata(header: ImageHeader) -> dict[str, Any]:
    """OME physical pixel size (µm) from the TIFF resolution, where it has a unit.

    >>> h = ImageHeader((8, 8), "YX", np.dtype("uint8"), (20000.0, 10000.0), 3, None)
    >>> physical_metadata(h)
    {'PhysicalSizeX': 0.5, 'PhysicalSizeXUnit': 'µm', 'PhysicalSizeY': 1.0, 'PhysicalSizeYUnit': 'µm'}
    """
    size = header.pixel_size_um
    if size is None:
        return {}
    sy, sx = size
    return {"PhysicalSizeX": sx, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": sy, "PhysicalSizeYUnit": "µm"}


class PyramidTiffSink(_StreamedTiff):
    """uint8 labels (or ``dtype``) of one 2-D image streamed into a pyramidal OME-TIFF at ``target``."""

    def __init__(self, target: Path, header: ImageHeader, dtype: npt.DTypeLike = np.uint8) -> None:
        if header.stack_axes:
            raise UnsupportedImageError(f"a pyramid needs a single 2-D image; this one has axes {header.axes}")
        h, w = header.height, header.width
        options = _tiff_options(header, w)
        super().__init__(target, dtype)
        tmp, dtype = self.tmp, self.dtype

        def consume(bands: Iterator[npt.NDArray[Any]]) -> None:
            levels: list[_LevelFile] = []
            try:
                for f in pyramid_factors(h, w):
                    levels.append(_LevelFile(tmp.parent, f, w, dtype))

                def base() -> Iterator[npt.NDArray[Any]]:
                    y0 = 0
                    for band in bands:
                        for level in levels:
                            level.add(band, y0)
                        y0 += band.shape[0]
                        yield band
                        if y0 >= h:
                            return

                metadata = {"axes": "YX", **physical_metadata(header)}
                with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
                    tif.write(
                        _plane_tiles(base(), h, w, OUTPUT_TILE),
                        shape=(h, w),
                        dtype=dtype,
                        subifds=len(levels),
                        metadata=metadata,
                        **options,
                    )
                    for level in levels:
                        level_options = dict(options, buffersize=4 * OUTPUT_TILE * max(level.width, OUTPUT_TILE))
                        level_options.pop("extratags", None)
                        if header.resolution is not None:
                            level_options["resolution"] = tuple(r / level.factor for r in header.resolution)
                        level_tiles = _plane_tiles(level.bands(), level.rows, level.width, OUTPUT_TILE)
                        tif.write(
                            level_tiles,
                            shape=(level.rows, level.width),
                            dtype=dtype,
                            subfiletype=1,
                            metadata=None,
                            **level_options,
                        )
            finally:
                for level in levels:
                    level.close()

        self.start(consume)
