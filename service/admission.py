"""Admission: whether a request may run, decided from its TIFF header before a pixel is decoded.

Nothing here parses a file: the caller reads the header (and the compression codes of
the series it chose) once and hands them over. :func:`admit` holds the request to every
limit in turn and returns what it will cost:

* the tile size (:func:`check_tile_size`): within ``UNET_MAX_TILE_SIZE`` and valid for the network;
* the declared pixels (``UNET_MAX_PIXELS``) and decoded bytes (``UNET_MAX_IMAGE_MB``);
* the compression (:func:`check_compression`): only codecs whose decoded size the header bounds;
* the channels the model takes, and the size of the result (``UNET_MAX_IMAGE_MB``);
* the work (:func:`check_work`): tiles, and network-input pixels per image pixel.

A streamed job (``POST /jobs`` on the windowed path) reads windows and writes bands, so
the in-memory limits give way to ``UNET_JOBS_MAX_PIXELS``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace

import tifffile

from tiling import default_stride
from unet import GeometryError, geometry

from .errors import ImageTooLargeError, UnsupportedImageError
from .io import ImageHeader
from .scale import Scale
from .segmenter import Segmenter
from .settings import Settings

__all__ = [
    "BOUNDED_COMPRESSIONS",
    "SUGGESTED_TILE_SIZE",
    "WORK_FLOOR_PIXELS",
    "Admitted",
    "Work",
    "admit",
    "check_compression",
    "check_scaled",
    "check_tile_size",
    "check_work",
    "plan_work",
    "valid_tile_sizes",
]

# Codecs whose decoder tifffile bounds by the declared strip/tile size (``out=``): a
# compression bomb decodes to at most what the header declares, which is checked first.
# Image codecs (JPEG, JPEG 2000, WebP, ...) size their output from their own stream header.
BOUNDED_COMPRESSIONS = {
    1: "none",
    5: "LZW",
    8: "Deflate",
    32773: "PackBits",
    32946: "Deflate",
    34925: "LZMA",
    50000: "ZSTD",
}


def valid_tile_sizes(depth: int, largest: int) -> list[int]:
    """Valid output tile sizes up to ``largest``.

    >>> valid_tile_sizes(4, 700)
    [4, 20, 36, 52, 68, 84, 100, 116, 132, 148, 164, 180, 196, 212, 228, 244, 260, 276, 292, 308, 324, 340, 356, 372, 388, 404, 420, 436, 452, 468, 484, 500, 516, 532, 548, 564, 580, 596, 612, 628, 644, 660, 676, 692]
    """
    m2 = 2 * geometry.context_margin(depth)
    return [n - m2 for n in geometry.valid_input_sizes(depth, stop=largest + m2 + 1)]


@dataclass(frozen=True)
class Admitted:
    """What a request will cost, known before decoding."""

    header: ImageHeader
    tiles: int


WORK_FLOOR_PIXELS = 2**20  # an image is measured as at least this many pixels: small ones pass at any tile size
SUGGESTED_TILE_SIZE = 388  # the routes' default tile_size, suggested first when it fits


@dataclass(frozen=True)
class Work:
    """What tiling an image at one ``tile_size`` makes the network compute, from its shape alone."""

    tile_size: int
    tiles: int  # over all planes
    tile_in: tuple[int, int]  # network input of one tile (rows, cols); an axis shorter than the tile shrinks it
    computed: int  # network-input pixels over all tiles
    pixels: int  # image pixels over all planes (one channel)

    @property
    def per_pixel(self) -> float:
        """Network-input pixels computed per image pixel (~2.2 at tile_size 388 on a large image)."""
        return self.computed / self.pixels


def plan_work(height: int, width: int, planes: int, tile_size: int, depth: int) -> Work:
    """The tiles and pixels :func:`tiling.plan_tiles` would lay out, counted without building the plan.

    A plan holds every tile (seconds and ~90 MiB for 10**5 tiles), so the limits are
    decided from this arithmetic first; it follows ``plan_tiles`` axis by axis (a test holds the two equal).

    >>> w = plan_work(1, 10_000_000, 1, 388, 4)  # one row: tiles shrink to 4 rows, but 188 are computed
    >>> w.tiles, w.tile_in, round(w.per_pixel)
    (26042, (188, 572), 280)
    """
    margin2, period = 2 * geometry.context_margin(depth), geometry.pooling_period(depth)

    def axis(n: int) -> tuple[int, int]:
        out = min(tile_size, geometry.smallest_valid_output_at_least(n, depth))
        stride = default_stride(out, period)
        return (1 if n <= out else 1 + math.ceil((n - out) / stride)), out + margin2

    (rows, rows_in), (cols, cols_in) = axis(height), axis(width)
    tiles = rows * cols * planes
    return Work(tile_size, tiles, (rows_in, cols_in), tiles * rows_in * cols_in, height * width * planes)


def check_work(header: ImageHeader, depth: int, settings: Settings, *, tile_size: int, jobs: bool = False) -> Work:
    """Refuse a request whose tiling is too much work: 422 where another tile_size fits, else 413.

    Two limits: the tiles of one request (``UNET_MAX_TILES``; ``UNET_JOBS_MAX_TILES`` for a
    job), and the network-input pixels computed per image pixel (``UNET_MAX_WORK_PER_PIXEL``),
    which catches what a tile count alone lets through: a tiny ``tile_size`` (4 computes
    188x188 inputs per 4x4 output) and an image too thin for tiles (1 x 10**7 pixels).
    """
    planes = header.pixels // (header.channels * header.height * header.width)
    max_tiles = settings.jobs_max_tiles if jobs else settings.max_tiles
    tiles_var = "UNET_JOBS_MAX_TILES" if jobs else "UNET_MAX_TILES"
    ratio = settings.max_work_per_pixel

    def light(w: Work) -> bool:
        return w.computed <= ratio * max(w.pixels, WORK_FLOOR_PIXELS)

    def fits(w: Work, most: int = max_tiles) -> bool:
        return w.tiles <= most and light(w)

    work = plan_work(header.height, header.width, planes, tile_size, depth)
    if fits(work):
        return work
    shape = f"{header.height:,} x {header.width:,}" + (f" (x {planes:,} planes)" if planes > 1 else "")
    if not light(work):
        problem = (
            f"at tile_size={tile_size} the network would compute {work.computed:,} input pixels ({work.tiles:,} tiles of "
            f"{work.tile_in[0]}x{work.tile_in[1]}) for this {shape} image: {work.per_pixel:,.0f} per image pixel; "
            f"the limit is {ratio:g} (UNET_MAX_WORK_PER_PIXEL)"
        )
    else:
        problem = (
            f"at tile_size={tile_size} this {shape} image needs {work.tiles:,} tiles; this server runs at most "
            f"{max_tiles:,} per {'job' if jobs else 'request'} ({tiles_var})"
        )
    to_jobs = ""
    if not jobs and settings.jobs_workers > 0 and fits(work, settings.jobs_max_tiles):
        to_jobs = f", or submit it to POST /jobs (up to {settings.jobs_max_tiles:,} tiles, UNET_JOBS_MAX_TILES)"
    others = [
        plan_work(header.height, header.width, planes, t, depth)
        for t in valid_tile_sizes(depth, settings.max_tile_size)
    ]
    fitting = [w for w in others if fits(w)]
    if fitting:  # the option is the problem
        best = next((w for w in fitting if w.tile_size == SUGGESTED_TILE_SIZE), min(fitting, key=lambda w: w.computed))
        n = f"{best.tiles:,} tile{'s' if best.tiles > 1 else ''}"
        raise GeometryError(f"{problem}; use tile_size={best.tile_size} ({n}){to_jobs}")
    if not any(light(w) for w in others):  # the image's shape: most of every tile falls outside it
        raise ImageTooLargeError(
            f"{problem}; no tile_size brings it within the limits, since most of every tile falls outside an image "
            "(or plane) this thin or small: send a 2-D region with more rows and columns"
        )
    raise ImageTooLargeError(f"{problem}; no tile_size brings it within the limits: send a smaller image{to_jobs}")


def check_tile_size(tile_size: int, depth: int, settings: Settings) -> None:
    """Refuse a tile size over ``UNET_MAX_TILE_SIZE`` or one the network cannot take (naming sizes that fit).

    >>> check_tile_size(390, 4, Settings())
    Traceback (most recent call last):
    ...
    unet.errors.GeometryError: invalid tile_size=390: output size 390 is not valid for a depth-4 valid U-Net (sizes are 16k-60 with k >= 4); nearest valid output sizes: 388 or 404
    """
    if tile_size > settings.max_tile_size:
        below = max(n for n in valid_tile_sizes(depth, settings.max_tile_size))
        raise GeometryError(
            f"tile_size {tile_size} exceeds this server's limit of {settings.max_tile_size} "
            f"(UNET_MAX_TILE_SIZE); the largest valid size allowed is {below}"
        )
    try:
        geometry.input_size(tile_size, depth)
    except GeometryError as e:  # it names the nearest valid sizes
        raise GeometryError(f"invalid tile_size={tile_size}: {e}") from None


def check_compression(codes: Collection[int]) -> None:
    """Refuse a series stored in a codec whose decoded size the TIFF header does not bound.

    ``codes``: the TIFF compression codes of the series' pages.

    >>> check_compression({1, 8})
    >>> check_compression({8, 7})
    Traceback (most recent call last):
    ...
    service.errors.UnsupportedImageError: compression JPEG is not accepted by the server (its decoded size is not bounded by the TIFF header); expected one of: Deflate, LZMA, LZW, PackBits, ZSTD, none
    """
    unbounded = sorted(set(codes) - set(BOUNDED_COMPRESSIONS))
    if unbounded:
        names = ", ".join(_compression_name(c) for c in unbounded)
        accepted = ", ".join(sorted(set(BOUNDED_COMPRESSIONS.values())))
        raise UnsupportedImageError(
            f"compression {names} is not accepted by the server (its decoded size is not bounded by the TIFF header); "
            f"expected one of: {accepted}"
        )


def admit(
    header: ImageHeader,
    segmenter: Segmenter,
    settings: Settings,
    *,
    output: str,
    tile_size: int,
    compressions: Collection[int] = (),
    jobs: bool = False,
    streamed: bool = False,
) -> Admitted:
    """Hold a request to every limit, from its header alone; what it will cost if it passes.

    ``compressions``: the compression codes of the chosen series (:func:`check_compression`).
    ``jobs``: the request is a job (``POST /jobs``), held to the jobs' tile limit. ``jobs`` and
    ``streamed``: a job on the streamed path, held to ``UNET_JOBS_MAX_PIXELS`` instead of
    ``UNET_MAX_PIXELS`` and to no decoded or result size (it never holds the image, nor its
    labels, in memory). That the strips/tiles lie inside the file is the caller's check.
    """
    depth = segmenter.depth
    check_tile_size(tile_size, depth, settings)
    relaxed = jobs and streamed
    max_pixels = settings.jobs_max_pixels if relaxed else settings.max_pixels
    if header.pixels > max_pixels:
        raise ImageTooLargeError(
            f"image declares {header.pixels:,} pixels (axes {header.axes}, shape {header.shape}); "
            f"the limit is {max_pixels:,}"
        )
    decoded = header.pixels * header.dtype.itemsize
    if not relaxed and decoded > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"image would take {decoded / 2**20:,.0f} MiB decoded ({header.pixels:,} pixels of {header.dtype.name}); "
            f"the limit is {settings.max_image_mb:g} MiB (UNET_MAX_IMAGE_MB)"
        )
    check_compression(compressions)
    segmenter.check(header)
    planes = header.pixels // header.channels
    k = segmenter.checkpoint.config.num_classes
    result = planes * {"probabilities": k * 4, "instances": 4}.get(output, 1)
    if not relaxed and result > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"the {output} result would take {result / 2**20:,.0f} MiB; the limit is "
            f"{settings.max_image_mb:g} MiB (UNET_MAX_IMAGE_MB); ask for output=labels or send a smaller image"
        )
    work = check_work(header, depth, settings, tile_size=tile_size, jobs=jobs)
    return Admitted(header, work.tiles)


def check_scaled(
    header: ImageHeader, scale: Scale, depth: int, settings: Settings, tile_size: int, *, jobs: bool = False
) -> int:
    """:func:`check_work` for the image as it is segmented once rescaled (``scale``); its tiles.

    A rescale chosen from the objects' size is known only once the pixels are read, so this
    runs after admission; an image enlarged past the limits gets the same 422/413."""
    h, w = scale.shape
    shape = list(header.shape)
    shape[header.axes.index("Y")], shape[header.axes.index("X")] = h, w
    scaled = replace(header, shape=tuple(shape))
    try:
        return check_work(scaled, depth, settings, tile_size=tile_size, jobs=jobs).tiles
    except (GeometryError, ImageTooLargeError) as e:
        raise type(e)(
            f"{e} (the image rescaled by {scale.factor:.3g} to {w}x{h} for its objects' size; "
            "give diameter=off or the objects' diameter in px)"
        ) from None


def _compression_name(code: int) -> str:
    try:
        return str(tifffile.COMPRESSION(code).name)
    except ValueError:
        return str(code)
