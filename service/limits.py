"""What keeps one request from harming the server or the others.

* :func:`receive_upload`: the body, counted while it arrives (Content-Length is only an
  early hint), raw or as multipart field ``file``, spooled to disk above a threshold;
* :func:`check_request`: everything decided from the TIFF header before a pixel is
  decoded (declared pixels and bytes, compression, channels, tile size, result size) and
  the work (:func:`check_work`: tiles, network-input pixels per image pixel);
* :class:`DeviceSlots`: N segmentations at once plus a bounded queue; beyond it, 503;
* :class:`Job`: a cancel flag and a deadline that the engine's progress callback checks,
  so a client that leaves or a request past its time limit stops at the next batch.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import anyio
import python_multipart
import tifffile
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from tiling import default_stride
from unet import GeometryError, geometry

from .errors import (
    CorruptImageError,
    ImageTooLargeError,
    InputError,
    NotATiffError,
    UnsupportedImageError,
    storage_error,
)
from .http_errors import ClientDisconnectedError, HTTPLayerError, TimeLimitError, UnavailableError, UploadTimeoutError
from .io import ImageHeader, check_segments, read_header, series_of
from .segmenter import Segmenter
from .settings import Settings

__all__ = [
    "BOUNDED_COMPRESSIONS",
    "SUGGESTED_TILE_SIZE",
    "WORK_FLOOR_PIXELS",
    "Admitted",
    "DeviceSlots",
    "Job",
    "MultipartFile",
    "Spool",
    "Work",
    "check_request",
    "check_work",
    "copy_body",
    "plan_work",
    "receive_upload",
    "run_guarded",
    "valid_tile_sizes",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

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
_POLL_S = 0.1


class Spool:
    """A write-once buffer: in memory up to ``threshold`` bytes, then in a temporary file.

    The file is named (tifffile reads it like any file) and deleted on :meth:`close`. A write
    the disk refuses (full, quota) raises :class:`~service.errors.StorageFullError` (507).
    """

    doing = "spooling the upload to disk"  # what a failed write was doing, for its message

    def __init__(self, threshold: int, directory: Path | None = None) -> None:
        self.threshold = threshold
        self.directory = directory
        self.size = 0
        self._buf: Any = io.BytesIO()
        self.on_disk = False

    def write(self, data: bytes) -> None:
        try:
            if not self.on_disk and self.size + len(data) > self.threshold:
                disk = tempfile.NamedTemporaryFile(dir=self.directory, prefix="unet-upload-", suffix=".tif")  # noqa: SIM115
                memory, self._buf, self.on_disk = self._buf, disk, True
                disk.write(memory.getbuffer())
            self._buf.write(data)
        except OSError as e:
            raise storage_error(e, self.doing) from None
        self.size += len(data)

    @property
    def path(self) -> str | None:
        """The spool file's path once the content went to disk, else None."""
        return str(self._buf.name) if self.on_disk else None

    def file(self) -> BinaryIO:
        """The content as a binary file positioned at 0."""
        try:
            self._buf.flush()
        except OSError as e:
            raise storage_error(e, self.doing) from None
        self._buf.seek(0)
        return self._buf  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close and delete; never raises (a flush the full disk refuses only concerns bytes being thrown away)."""
        try:
            self._buf.close()
        except OSError as e:
            log.debug("closing a spool: %s", e)


class MultipartFile:
    """Feeds a multipart/form-data body through python-multipart, keeping field ``file`` only."""

    def __init__(self, content_type: str, spool: Spool) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise InputError("multipart body without a boundary in its Content-Type")
        self.spool = spool
        self.fields: list[str] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._in_file = False
        self.found = 0
        self.parser = python_multipart.MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_val,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
            },
        )

    def _part_begin(self) -> None:
        self._disposition, self._in_file = b"", False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_val(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self.fields.append(name)
        self._in_file = name == "file"
        if self._in_file:
            self.found += 1
            if self.found > 1:
                raise InputError("expected one multipart field 'file', got several")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.spool.write(data[start:end])

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError:
            raise InputError("malformed multipart/form-data body") from None

    def finish(self) -> None:
        try:
            self.parser.finalize()
        except FormParserError:
            raise InputError("malformed multipart/form-data body") from None
        if not self.found:
            got = ", ".join(repr(f) for f in self.fields) or "none"
            raise InputError(f"expected the TIFF in multipart field 'file', got fields: {got}")


def _too_big(settings: Settings, declared: int | None = None) -> ImageTooLargeError:
    limit = f"the limit is {settings.max_upload_bytes:,} bytes (UNET_MAX_UPLOAD_MB={settings.max_upload_mb:g})"
    if declared is not None:
        return ImageTooLargeError(f"request body declares {declared:,} bytes; {limit}")
    return ImageTooLargeError(f"request body is larger than allowed: {limit}")


async def copy_body(
    request: Request,
    sink: Spool,
    *,
    max_bytes: int | None = None,
    too_big: Exception | None = None,
    idle_s: float | None = None,
    within_s: float | None = None,
    time_limit: str = "",
) -> None:
    """Copy the TIFF into ``sink``: the raw body, or multipart field ``file``.

    Counts the bytes received (raw, multipart framing included) and raises ``too_big``
    past ``max_bytes``; refuses an empty upload. The upload's time limits give
    :class:`UploadTimeoutError` (408): ``within_s`` for the whole body (``time_limit``
    says which limit that is, in the message: "2 s", "3600 s (UNET_JOBS_UPLOAD_TIMEOUT_S)"),
    ``idle_s`` between two chunks. A client that disconnects raises
    :class:`ClientDisconnectedError`.
    """
    try:
        with anyio.fail_after(within_s):
            await _copy_chunks(request, sink, max_bytes, too_big, idle_s)
    except TimeoutError:  # the overall limit: a stall between chunks is answered inside
        raise UploadTimeoutError(f"the upload did not complete within {time_limit or f'{within_s:g} s'}") from None
    except ClientDisconnect:
        raise ClientDisconnectedError("client disconnected during the upload") from None


async def _copy_chunks(
    request: Request, sink: Spool, max_bytes: int | None, too_big: Exception | None, idle_s: float | None
) -> None:
    content_type = request.headers.get("content-type", "")
    form = MultipartFile(content_type, sink) if content_type.startswith("multipart/form-data") else None
    write = form.write if form is not None else sink.write
    received = 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(idle_s):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise UploadTimeoutError(f"the upload stalled: no data for {idle_s:g} s after {received:,} bytes") from None
        received += len(chunk)
        if max_bytes is not None and received > max_bytes:
            raise too_big or ImageTooLargeError(f"request body is larger than {max_bytes:,} bytes")
        write(chunk)
    if form is not None:
        form.finish()
    if sink.size == 0:
        raise NotATiffError(
            "empty upload; expected a TIFF as the body (Content-Type: image/tiff) or as multipart field 'file'"
        )


async def receive_upload(request: Request, settings: Settings, deadline: float) -> Spool:
    """The uploaded TIFF (raw body, or multipart field ``file``), size-limited while streaming."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading (curl waits on 100-continue)
        raise _too_big(settings, int(declared))
    spool = Spool(settings.spool_bytes, settings.spool_dir)
    try:
        await copy_body(
            request,
            spool,
            max_bytes=limit,
            too_big=_too_big(settings),
            within_s=max(deadline - time.monotonic(), 0.001),
            time_limit=f"{settings.request_timeout_s:g} s",
        )
    except BaseException:
        spool.close()
        raise
    if spool.on_disk:
        log.debug("spooled a %d-byte upload to disk", spool.size)
    return spool


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


def check_request(
    src: BinaryIO,
    segmenter: Segmenter,
    settings: Settings,
    *,
    output: str,
    tile_size: int,
    jobs: bool = False,
    series: int = 0,
) -> Admitted:
    """Check the request against every limit from the TIFF header alone (no pixel decoded).

    ``jobs``: the request is a job (``POST /jobs``), held to the jobs' tile limit.
    """
    depth = segmenter.depth
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
    header = read_header(src, max_pixels=settings.max_pixels, series=series)
    decoded = header.pixels * header.dtype.itemsize
    if decoded > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"image would take {decoded / 2**20:,.0f} MiB decoded ({header.pixels:,} pixels of {header.dtype.name}); "
            f"the limit is {settings.max_image_mb:g} MiB (UNET_MAX_IMAGE_MB)"
        )
    src.seek(0)
    _check_storage(src, series)
    segmenter.check(header)
    planes = header.pixels // header.channels
    k = segmenter.checkpoint.config.num_classes
    result = planes * (k * 4 if output == "probabilities" else 1)
    if result > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"the {output} result would take {result / 2**20:,.0f} MiB; the limit is "
            f"{settings.max_image_mb:g} MiB (UNET_MAX_IMAGE_MB); ask for output=labels or send a smaller image"
        )
    work = check_work(header, depth, settings, tile_size=tile_size, jobs=jobs)
    return Admitted(header, work.tiles)


def _check_storage(src: BinaryIO, index: int = 0) -> None:
    """The chosen series' strips/tiles: inside the file (a truncated upload is refused at
    admission, on /jobs as on /segment) and in a codec whose decoded size the header bounds."""
    try:
        with tifffile.TiffFile(src) as tif:
            check_segments(tif, index)
            series = series_of(tif)[index]  # the series that will be decoded
            codes = {int(p.compression) for p in series.pages if isinstance(p, tifffile.TiffPage)}
            codes.add(int(series.keyframe.compression))
    except CorruptImageError:
        raise
    except Exception as e:  # tifffile reads every page here; a corrupt one raises TiffFileError, ValueError, ...
        raise CorruptImageError(f"corrupt TIFF: {e}") from None
    unbounded = sorted(codes - set(BOUNDED_COMPRESSIONS))
    if unbounded:
        names = ", ".join(_compression_name(c) for c in unbounded)
        accepted = ", ".join(sorted(set(BOUNDED_COMPRESSIONS.values())))
        raise UnsupportedImageError(
            f"compression {names} is not accepted by the server (its decoded size is not bounded by the TIFF header); "
            f"expected one of: {accepted}"
        )
    src.seek(0)


def _compression_name(code: int) -> str:
    try:
        return str(tifffile.COMPRESSION(code).name)
    except ValueError:
        return str(code)


class Job:
    """A cancel flag and a deadline shared by the request coroutine and its worker thread."""

    def __init__(self, deadline: float, timeout_s: float) -> None:
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.reason: HTTPLayerError | None = None

    def cancel(self, reason: HTTPLayerError) -> None:
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        """Raise if the work should stop: called between batches, decode and encode."""
        if self.reason is None and time.monotonic() > self.deadline:
            self.cancel(TimeLimitError(f"the segmentation did not finish within {self.timeout_s:g} s"))
        if self.reason is not None:
            raise self.reason


class DeviceSlots:
    """``slots`` segmentations at once and at most ``queue_size`` more admitted, FIFO."""

    def __init__(self, slots: int, queue_size: int, retry_after_s: int) -> None:
        self.slots = slots
        self.capacity = slots + queue_size
        self.retry_after_s = retry_after_s
        self.admitted = 0
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.stop_at: float | None = None  # set by shut_down(): when work in progress gives up

    def shut_down(self, grace_s: float) -> None:
        """The server began shutting down with ``grace_s`` for requests in progress.

        Nothing new is admitted; a request still queued or running when the grace period
        (less a margin to answer in: half of it, at most 1 s) is over gets 503 with
        ``Retry-After`` from :meth:`check_open`, and its worker stops at the next batch. So
        the app answers before uvicorn cancels what is left.

        >>> s = DeviceSlots(1, 0, 5); s.shut_down(0); s.check_open()
        Traceback (most recent call last):
        ...
        service.http_errors.UnavailableError: server shutting down; the request did not finish within the shutdown grace period, retry later
        """
        self.stop_at = time.monotonic() + max(grace_s - min(1.0, grace_s / 2), 0.0)

    def check_open(self) -> None:
        """Raise 503 once a shutdown's grace period for work in progress is over."""
        if self.stop_at is not None and time.monotonic() >= self.stop_at:
            raise UnavailableError(
                "server shutting down; the request did not finish within the shutdown grace period, retry later",
                self.retry_after_s,
            )

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    def admit(self) -> None:
        if self.stop_at is not None:
            raise UnavailableError("server shutting down; retry later", self.retry_after_s)
        if self.admitted >= self.capacity:
            raise UnavailableError(
                f"server busy: {self.running} segmentation(s) running and {self.queued} queued "
                f"(capacity {self.capacity}); retry later",
                self.retry_after_s,
            )
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1

    async def acquire(self, watch: Callable[[], Awaitable[None]]) -> None:
        """Wait for a slot in FIFO order; ``watch()`` runs between polls and may raise to give up."""
        if self.running < self.slots and not self._waiting:
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=_POLL_S)
                if not fut.done():
                    await watch()
                    self.check_open()
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # a slot was handed to us as we left: pass it on
            else:
                fut.cancel()
                self._waiting.remove(fut)
            raise

    def release(self) -> None:
        """Hand the slot to the next waiter, or free it."""
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1


async def run_guarded(
    request: Request,
    job: Job,
    executor: Executor,
    fn: Callable[[], T],
    on_done: Callable[[], None],
    check_open: Callable[[], None] | None = None,
) -> T:
    """Run ``fn`` on ``executor``; cancel ``job`` if the client leaves or time runs out.

    ``on_done`` runs when the worker has really finished (not when this coroutine is
    cancelled), so a device slot is never freed while the device is still busy. When
    ``check_open`` raises (:meth:`DeviceSlots.check_open`: a shutdown's grace period is
    over), the job is cancelled and the error raised at once: the answer must go out
    before uvicorn cancels the request, the worker stops at its next batch regardless.
    """
    loop = asyncio.get_running_loop()
    try:
        fut = loop.run_in_executor(executor, fn)
    except BaseException:
        on_done()
        raise

    def finished(f: asyncio.Future[T]) -> None:
        on_done()
        if not f.cancelled():
            f.exception()  # retrieved here too: after a shutdown cancel, nobody else will

    fut.add_done_callback(finished)
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=_POLL_S)
            if done:
                return fut.result()
            if await request.is_disconnected():
                job.cancel(ClientDisconnectedError("client disconnected; work abandoned"))
            elif time.monotonic() > job.deadline:
                job.cancel(TimeLimitError(f"the segmentation did not finish within {job.timeout_s:g} s"))
            if check_open is not None:
                try:
                    check_open()
                except HTTPLayerError as e:
                    job.cancel(e)
                    raise
    except asyncio.CancelledError:  # server shutdown past its grace period: stop the worker too
        job.cancel(UnavailableError("server shutting down", 1))
        raise
