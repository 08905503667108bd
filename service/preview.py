"""Previews: the input as the model saw it, with the mask's outlines, at every zoom level.

A preview is one file (``preview.bin`` of a job, a temporary one for ``--preview``): a
pyramid of 256 x 256 chunks, each holding the display image (the input stretched by the
plane's fitted normalization: the window the network's inputs span, low end black, high end
white; grey, or colour for a 3-channel input) and a code per pixel (its class, and whether
it lies on an outline). It is built while the result streams, so memory stays O(256 rows x
width) per level, and read one chunk at a time, so a tile or an overview never decodes the
whole result.

- :class:`PreviewWriter` takes whole-width bands (labels, uint32 instance ids) top to bottom
  with the input's rows; level ``k`` is ``2**k`` times smaller (the display image by 2 x 2
  means of level ``k - 1``, the values by nearest neighbour: every ``2**k``-th pixel of level
  0, as the TIFF and OME-Zarr pyramids do), down to the level that fits one chunk.
- Outlines are drawn per level from that level's values: a pixel of an object (not
  background) with a 4-neighbour of another value (another class, another instance, or
  background), so they are one pixel wide at every zoom and touching instances are parted.
- :class:`PreviewSink` tees any image sink into a writer (plane 0 of a stack is previewed).
- :class:`Preview` reads the file: :meth:`Preview.tile` (PNG layers ``overlay``, ``image``,
  ``outline`` and ``fill``), :meth:`Preview.overview` (one PNG at most ``max_size`` on a
  side, assembled from the finest level that fits) and :meth:`Preview.describe`.

The file: the compressed chunks (zstd), then a JSON index (levels, shapes, chunk offsets,
classes and colours), its length (8 bytes, little-endian) and ``MAGIC``. It is written to a
temporary path beside the target and renamed when complete (:func:`unet.atomic.atomic_path`).
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np
import numpy.typing as npt

from tiling import BandSink, Tile, TilePlan, TileSink
from unet import ChannelAffine
from unet.atomic import AtomicTarget

from .errors import InputError, TileNotFoundError
from .io import ImageHeader
from .sinks import BandWriter, ImageSink

__all__ = [
    "MAGIC",
    "PALETTE",
    "TILE",
    "Layer",
    "Preview",
    "PreviewSink",
    "PreviewWriter",
    "Style",
    "class_colors",
    "level_shapes",
    "outlines",
    "preview_writer_for",
]

TILE = 256  # chunk and tile edge
MAGIC = b"UNETPRV1"
OUTLINE = 0x80  # the code's outline bit; the low 7 bits hold the class
_ROWS = 64  # input rows stretched at once (float32 scratch: C x 64 x width)
_FOOTER = struct.Struct("<Q8s")
Layer = Literal["overlay", "image", "outline", "fill"]
Style = Literal["outline", "fill", "none"]

PALETTE: tuple[tuple[int, int, int], ...] = (  # rgb of classes 1, 2, ... (cycled); background has none
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


def class_colors(count: int, background: int) -> list[tuple[int, int, int] | None]:
    """The colour of each class value ``0..count-1``: the palette in order, none for the background.

    >>> class_colors(3, 0)
    [None, (230, 25, 75), (60, 180, 75)]
    """
    colors: list[tuple[int, int, int] | None] = []
    n = 0
    for k in range(count):
        if k == background:
            colors.append(None)
        else:
            colors.append(PALETTE[n % len(PALETTE)])
            n += 1
    return colors


def level_shapes(height: int, width: int, tile: int = TILE) -> list[tuple[int, int]]:
    """Each level's (height, width): level ``k`` is ``ceil(size / 2**k)``, down to one tile.

    >>> level_shapes(1000, 600)
    [(1000, 600), (500, 300), (250, 150)]
    >>> level_shapes(10, 10)
    [(10, 10)]
    """
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def outlines(
    values: npt.NDArray[Any], above: npt.NDArray[Any] | None, below: npt.NDArray[Any] | None, background: int
) -> npt.NDArray[np.bool_]:
    """Pixels of ``values`` (rows of one level) not of ``background`` with a 4-neighbour of
    another value; ``above``/``below``: the rows just outside (None at the image's edge,
    which draws no line).

    >>> v = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 2, 2], [0, 0, 2, 2]])
    >>> outlines(v, None, None, 0).astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]]
    """
    up = values[:1] if above is None else above[np.newaxis]
    down = values[-1:] if below is None else below[np.newaxis]
    ext = np.concatenate([up, values, down])
    edge: npt.NDArray[np.bool_] = (values != ext[:-2]) | (values != ext[2:])
    edge[:, 1:] |= values[:, 1:] != values[:, :-1]
    edge[:, :-1] |= values[:, :-1] != values[:, 1:]
    edge &= values != background
    return edge


def _halve(image: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """2 x 2 means of (D, h, w) uint8 (an odd last row or column repeated), rounded."""
    h, w = image.shape[1:]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    s = image[:, 0::2, 0::2].astype(np.uint16)  # four strided adds: ~10x numpy's reduce over two axes
    s += image[:, 1::2, 0::2]
    s += image[:, 0::2, 1::2]
    s += image[:, 1::2, 1::2]
    s += 2
    s >>= 2
    out: npt.NDArray[np.uint8] = s.astype(np.uint8)
    return out


class _Level:
    """One level under construction: rows in, 256-row blocks out (each with its outlines,
    which need the row above and the row below), halved into the next level. A block is
    coded and stored one chunk column at a time, so the scratch stays O(256 x 258)."""

    def __init__(self, owner: PreviewWriter, index: int) -> None:
        self.owner, self.index = owner, index
        self.shape = owner.shapes[index]
        self.stored = owner.stored[index]
        self.grid = (math.ceil(self.shape[0] / TILE), math.ceil(self.shape[1] / TILE))
        self.chunks: list[tuple[int, int]] = []  # (offset, length), row-major
        self.next: _Level | None = None
        self._image: list[npt.NDArray[np.uint8]] = []  # pending rows, in pieces (views of what came in)
        self._values: list[npt.NDArray[Any]] = []
        self._held = 0
        self._above: npt.NDArray[Any] | None = None  # the row before the next block

    def add(self, image: npt.NDArray[np.uint8], values: npt.NDArray[Any]) -> None:
        self._image.append(image)
        self._values.append(values)
        self._held += values.shape[0]
        while self._held > TILE:  # the block and the row below it are here
            self._emit(TILE, last=False)

    def flush(self) -> None:
        if self._held:
            self._emit(self._held, last=True)
        if self.next is not None:
            self.next.flush()

    def _take(self, rows: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[Any]]:
        """The first ``rows`` pending rows (one copy at most), dropped from the pending pieces."""
        images, values, need = [], [], rows
        while need:
            im, va = self._image[0], self._values[0]
            n = min(need, va.shape[0])
            images.append(im[:, :n])
            values.append(va[:n])
            need -= n
            if n == va.shape[0]:
                del self._image[0], self._values[0]
            else:
                self._image[0], self._values[0] = im[:, n:], va[n:]
        self._held -= rows
        if len(values) == 1:
            return images[0], values[0]
        return np.concatenate(images, axis=1), np.concatenate(values)

    def _emit(self, rows: int, *, last: bool) -> None:
        image, values = self._take(rows)
        below = None if last else self._values[0][0]
        if self.stored:
            self._store(image, values, below)
        self._above = values[-1].copy()
        if self.next is not None:
            self.next.add(_halve(image), np.ascontiguousarray(values[::2, ::2]))

    def _store(self, image: npt.NDArray[np.uint8], values: npt.NDArray[Any], below: npt.NDArray[Any] | None) -> None:
        width = values.shape[1]
        for tx in range(self.grid[1]):
            x0, x1 = tx * TILE, min((tx + 1) * TILE, width)
            a, b = max(x0 - 1, 0), min(x1 + 1, width)  # one column either side for the outlines
            strip = values[:, a:b]
            edge = outlines(
                strip,
                None if self._above is None else self._above[a:b],
                None if below is None else below[a:b],
                self.owner.background_value,
            )[:, x0 - a : x1 - a]
            code = self.owner.classes_of(values[:, x0:x1])
            code[edge] |= OUTLINE
            chunk = np.concatenate([image[:, :, x0:x1], code[np.newaxis]])
            self.chunks.append(self.owner.write_chunk(chunk))


class PreviewWriter:
    """The preview of one (height, width) plane into ``target``, from whole-width bands.

    ``classes``: the class names of the values (labels), or None for instances (uint32 ids,
    0 = background: every object shows as class 1, ``object``). ``channels``: the input's.
    ``max_edge``: store only the levels no larger than this on either side (an overview of
    that size needs no more); None stores all. Call :meth:`normalized` before the first band.
    """

    def __init__(
        self,
        target: Path,
        shape: tuple[int, int],
        channels: int,
        *,
        classes: Sequence[str] | None,
        background: int = 0,
        max_edge: int | None = None,
    ) -> None:
        self.target = Path(target)
        self.height, self.width = shape
        self.channels = channels
        self.display = 3 if channels == 3 else 1  # colour for RGB, else grey (the mean of the channels)
        self.instances = classes is None
        self.class_names = ["background", "object"] if classes is None else list(classes)
        self.background = 0 if classes is None else background
        self.background_value = 0 if classes is None else background  # in the values the bands carry
        self.shapes = level_shapes(self.height, self.width)
        smallest = len(self.shapes) - 1
        self.stored = [max_edge is None or max(s) <= max_edge or k == smallest for k, s in enumerate(self.shapes)]
        self.affine: ChannelAffine | None = None
        self._rows = 0
        self._atomic = AtomicTarget(self.target)
        self.tmp = self._atomic.path
        self._file = open(self.tmp, "wb")  # noqa: SIM115  (closed by close() or abort())
        self._offset = 0
        self._closed = False
        self.levels = [_Level(self, k) for k in range(len(self.shapes))]
        for a, b in zip(self.levels, self.levels[1:], strict=False):
            a.next = b

    def normalized(self, affine: ChannelAffine) -> None:
        """The plane's fitted normalization: what the display image stretches by."""
        self.affine = affine

    def classes_of(self, values: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        out: npt.NDArray[np.uint8] = (values != 0).astype(np.uint8) if self.instances else values.astype(np.uint8)
        return out

    def display_rows(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
        """(C, rows, width) input rows as (display, rows, width) uint8: the normalization's
        window (:attr:`unet.ChannelAffine.window`) stretched to 0..255, rounded."""
        if self.affine is None:
            raise RuntimeError("normalized() must come before the first band")
        low, high = self.affine.window
        c = raw.shape[0]
        lo = np.asarray(low, np.float32).reshape(c, 1, 1)
        gain = np.float32(255.0) / np.maximum(np.asarray(high, np.float32).reshape(c, 1, 1) - lo, np.float32(1e-12))
        floats = np.dtype(raw.dtype).kind == "f"
        out = np.empty((self.display, raw.shape[1], raw.shape[2]), np.uint8)
        for r in range(0, raw.shape[1], _ROWS):
            v = np.asarray(raw[:, r : r + _ROWS]).astype(np.float32)
            v -= lo
            v *= gain
            if floats:  # no data shows black, +inf white
                np.nan_to_num(v, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            np.clip(v, 0.0, 255.0, out=v)
            if self.display == 1 and c > 1:
                v = v.mean(axis=0, keepdims=True)
            v += 0.5
            out[:, r : r + _ROWS] = v  # truncation of v + 0.5: rounded
        return out

    def add(self, values: npt.NDArray[Any], y0: int, raw: npt.NDArray[Any]) -> None:
        """Rows ``y0...`` of the result (labels or ids) and the input's same rows, (C, rows, width)."""
        if y0 != self._rows:
            raise RuntimeError(f"bands must come top to bottom: expected row {self._rows}, got {y0}")
        self._rows += values.shape[0]
        self.levels[0].add(self.display_rows(raw), values)

    def write_chunk(self, chunk: npt.NDArray[np.uint8]) -> tuple[int, int]:
        data = imagecodecs.zstd_encode(chunk.tobytes(), level=1)  # ~4x zlib's speed, as small
        self._file.write(data)
        at = self._offset
        self._offset += len(data)
        return at, len(data)

    def close(self) -> None:
        """Write the rest and the index, and close the temporary file (:meth:`finish` renames it)."""
        if self._closed:
            return
        try:
            if self._rows != self.height:
                raise RuntimeError(f"the preview got {self._rows} of {self.height} rows")
            self.levels[0].flush()
            index = {
                "version": 1,
                "codec": "zstd",
                "height": self.height,
                "width": self.width,
                "tile": TILE,
                "display": self.display,
                "kind": "instances" if self.instances else "labels",
                "background": self.background,
                "classes": [
                    {"value": k, "name": name, "rgb": list(rgb) if rgb else None}
                    for k, (name, rgb) in enumerate(
                        zip(self.class_names, class_colors(len(self.class_names), self.background), strict=True)
                    )
                ],
                "levels": [
                    {
                        "level": lv.index,
                        "factor": 2**lv.index,
                        "shape": list(lv.shape),
                        "grid": list(lv.grid),
                        "chunks": [list(c) for c in lv.chunks] if lv.stored else None,
                    }
                    for lv in self.levels
                ],
            }
            data = json.dumps(index, separators=(",", ":")).encode()
            self._file.write(data)
            self._file.write(_FOOTER.pack(len(data), MAGIC))
            self._file.close()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def finish(self) -> None:
        self.close()
        self._atomic.commit()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(BaseException):
            self._atomic.discard()


class _Tee:
    """A plane's tile sink that also stitches class labels into bands for the preview."""

    def __init__(self, inner: TileSink, bands: BandSink) -> None:
        self.inner, self.bands = inner, bands

    def add(self, tile: Tile, y: npt.NDArray[Any]) -> None:
        self.inner.add(tile, y)
        self.bands.add(tile, y if y.ndim == 2 else y.argmax(axis=0).astype(np.uint8))  # probabilities: the labels

    def finish(self) -> Any:
        self.bands.finish()
        return self.inner.finish()


class PreviewSink:
    """An image sink that also builds the preview of plane 0 (from its tiles, or from the
    bands a computing sink writes: instance ids); committed after the image, aborted with it."""

    def __init__(self, inner: ImageSink, writer: PreviewWriter, source: Any) -> None:
        self.inner, self.writer, self.source = inner, writer, source

    def normalized(self, index: int, affine: ChannelAffine) -> None:
        if index == 0:
            self.writer.normalized(affine)

    def _band(self, band: npt.NDArray[Any], y0: int) -> None:
        self.writer.add(band, y0, self.source.plane(0)[..., y0 : y0 + band.shape[0], :])

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        tiles = self.inner.plane(index, plan)
        return tiles if index else _Tee(tiles, BandSink(plan, np.uint8, self._band))

    def band_writer(self, index: int, dtype: npt.DTypeLike) -> BandWriter:
        write = self.inner.band_writer(index, dtype)
        if index:
            return write

        def both(band: npt.NDArray[Any], y0: int) -> None:
            write(band, y0)
            self._band(band, y0)

        return both

    def finish(self) -> None:
        try:
            self.writer.close()
            self.inner.finish()
        except BaseException:
            self.writer.abort()
            raise
        self.writer.finish()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self.inner.abort()
        self.writer.abort()


class Preview:
    """A preview file, read one chunk at a time. Raises :class:`~service.errors.InputError`
    for a file that is not one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                f.seek(-_FOOTER.size, 2)
                length, magic = _FOOTER.unpack(f.read(_FOOTER.size))
                if magic == MAGIC:
                    f.seek(-_FOOTER.size - length, 2)
                    self.index: dict[str, Any] = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as e:
            raise InputError(f"unreadable preview {self.path.name}: {e}") from None
        if magic != MAGIC:
            raise InputError(f"not a preview file: {self.path.name}")
        self.height, self.width = self.index["height"], self.index["width"]
        self.display = self.index["display"]
        self.levels: list[dict[str, Any]] = self.index["levels"]
        colors = np.zeros((128, 3), np.uint8)
        shown = np.zeros(128, bool)
        for c in self.index["classes"]:
            if c["rgb"] is not None:
                colors[c["value"]], shown[c["value"]] = c["rgb"], True
        self._colors, self._shown = colors, shown

    def describe(self) -> dict[str, Any]:
        """What a viewer needs: the size, the tile edge, the levels it may ask for, the classes."""
        return {
            "width": self.width,
            "height": self.height,
            "tile": self.index["tile"],
            "kind": self.index["kind"],
            "classes": self.index["classes"],
            "levels": [
                {"level": lv["level"], "factor": lv["factor"], "shape": lv["shape"], "grid": lv["grid"]}
                for lv in self.levels
                if lv["chunks"] is not None
            ],
        }

    def _level(self, level: int) -> dict[str, Any]:
        if not 0 <= level < len(self.levels) or self.levels[level]["chunks"] is None:
            kept = [lv["level"] for lv in self.levels if lv["chunks"] is not None]
            raise TileNotFoundError(f"no level {level} in this preview; levels are {kept[0]}..{kept[-1]}")
        return self.levels[level]

    def chunk(self, level: int, ty: int, tx: int) -> npt.NDArray[np.uint8]:
        """Chunk (ty, tx) of ``level``: (display + 1, h, w) uint8, the last plane the code."""
        lv = self._level(level)
        ny, nx = lv["grid"]
        if not (0 <= ty < ny and 0 <= tx < nx):
            raise TileNotFoundError(f"no tile {ty}/{tx} at level {level}; it has {ny} x {nx} tiles")
        offset, length = lv["chunks"][ty * nx + tx]
        h = min(TILE, lv["shape"][0] - ty * TILE)
        w = min(TILE, lv["shape"][1] - tx * TILE)
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = imagecodecs.zstd_decode(f.read(length))
        except FileNotFoundError:
            raise TileNotFoundError("the preview is gone (its job was deleted)") from None
        return np.frombuffer(data, np.uint8).reshape(self.display + 1, h, w)

    def _rgb(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        return np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image

    def render(self, chunk: npt.NDArray[np.uint8], layer: Layer, opacity: float = 1.0) -> npt.NDArray[np.uint8]:
        """(h, w, 3) RGB for ``overlay``/``image``, (h, w, 4) RGBA for ``outline``/``fill``."""
        image, code = chunk[:-1], chunk[-1]
        cls = code & 0x7F
        colors = self._colors[cls]  # (h, w, 3)
        if layer == "image":
            return np.ascontiguousarray(self._rgb(image).transpose(1, 2, 0))
        mask = self._shown[cls] & ((code & OUTLINE) != 0) if layer in ("overlay", "outline") else self._shown[cls]
        if layer == "overlay":
            return _blend(np.ascontiguousarray(self._rgb(image).transpose(1, 2, 0)), colors, mask, opacity)
        rgba = np.zeros((*code.shape, 4), np.uint8)
        rgba[..., :3] = colors
        rgba[..., 3] = mask * np.uint8(255)
        return rgba

    def tile(self, level: int, ty: int, tx: int, layer: Layer = "overlay") -> bytes:
        """One tile as PNG."""
        return _png(self.render(self.chunk(level, ty, tx), layer))

    def overview(self, max_size: int = 1024, style: Style = "outline", opacity: float = 1.0) -> bytes:
        """The whole image as one PNG, at most ``max_size`` on a side: the finest stored level
        that fits (at least half that size unless the image is smaller), its chunks read one by one."""
        kept = [lv for lv in self.levels if lv["chunks"] is not None]
        fits = [lv for lv in kept if max(lv["shape"]) <= max_size]
        if not fits:
            raise InputError(
                f"no preview level fits in {max_size} px; the smallest is {'x'.join(map(str, kept[-1]['shape']))}"
            )
        lv = fits[0]
        h, w = lv["shape"]
        out = np.empty((h, w, 3), np.uint8)
        layer: Layer = "image" if style == "none" else "overlay" if style == "outline" else "fill"
        ny, nx = lv["grid"]
        for ty in range(ny):
            for tx in range(nx):
                chunk = self.chunk(lv["level"], ty, tx)
                rows, cols = slice(ty * TILE, ty * TILE + chunk.shape[1]), slice(tx * TILE, tx * TILE + chunk.shape[2])
                if layer == "fill":
                    base = self.render(chunk, "image")
                    code = chunk[-1] & 0x7F
                    out[rows, cols] = _blend(base, self._colors[code], self._shown[code], opacity)
                else:
                    out[rows, cols] = self.render(chunk, layer, opacity)
        return _png(out)


def _blend(
    rgb: npt.NDArray[np.uint8], colors: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_], opacity: float
) -> npt.NDArray[np.uint8]:
    if opacity >= 1.0:
        rgb[mask] = colors[mask]
    elif opacity > 0.0:
        mixed = rgb[mask] * (1.0 - opacity) + colors[mask] * opacity
        rgb[mask] = (mixed + 0.5).astype(np.uint8)
    return rgb


def _png(pixels: npt.NDArray[np.uint8]) -> bytes:
    return bytes(imagecodecs.png_encode(pixels, level=1))


def preview_writer_for(
    target: Path, header: ImageHeader, classes: Sequence[str] | None, background: int, max_edge: int | None = None
) -> PreviewWriter:
    """A writer for the image ``header`` describes (its plane 0)."""
    return PreviewWriter(
        target,
        (header.height, header.width),
        header.channels,
        classes=classes,
        background=background,
        max_edge=max_edge,
    )
