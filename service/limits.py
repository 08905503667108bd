"""What keeps one request from harming the server or the others.

* :func:`receive_upload`: the body, counted while it arrives (Content-Length is only an
  early hint), raw or as multipart field ``file``, spooled to disk above a threshold;
* :func:`check_request`: everything decided from the TIFF header before a pixel is
  decoded (declared pixels and bytes, compression, channels, tile size, result size);
* :class:`DeviceSlots`: N segmentations at once plus a bounded queue; beyond it, 503;
* :class:`Job`: a cancel flag and a deadline that the engine's progress callback checks,
  so a client that leaves or a request past its time limit stops at the next batch.
"""

from __future__ import annotations

import asyncio
import io
import logging
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

from unet import GeometryError, geometry

from .errors import ImageTooLargeError, InputError, NotATiffError, UnsupportedImageError
from .http_errors import ClientDisconnectedError, HTTPLayerError, TimeLimitError, UnavailableError, UploadTimeoutError
from .io import ImageHeader, read_header
from .segmenter import Segmenter
from .settings import Settings

__all__ = [
    "BOUNDED_COMPRESSIONS",
    "Admitted",
    "DeviceSlots",
    "Job",
    "MultipartFile",
    "Spool",
    "check_request",
    "copy_body",
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

    The file is named (tifffile reads it like any file) and deleted on :meth:`close`.
    """

    def __init__(self, threshold: int, directory: Path | None = None) -> None:
        self.threshold = threshold
        self.directory = directory
        self.size = 0
        self._buf: Any = io.BytesIO()
        self.on_disk = False

    def write(self, data: bytes) -> None:
        if not self.on_disk and self.size + len(data) > self.threshold:
            disk = tempfile.NamedTemporaryFile(dir=self.directory, prefix="unet-upload-", suffix=".tif")  # noqa: SIM115
            disk.write(self._buf.getbuffer())
            self._buf, self.on_disk = disk, True
        self._buf.write(data)
        self.size += len(data)

    @property
    def path(self) -> str | None:
        """The spool file's path once the content went to disk, else None."""
        return str(self._buf.name) if self.on_disk else None

    def file(self) -> BinaryIO:
        """The content as a binary file positioned at 0."""
        self._buf.flush()
        self._buf.seek(0)
        return self._buf  # type: ignore[no-any-return]

    def close(self) -> None:
        self._buf.close()


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
    request: Request, sink: Spool, *, max_bytes: int | None = None, too_big: Exception | None = None
) -> None:
    """Copy the TIFF into ``sink``: the raw body, or multipart field ``file``.

    Counts the bytes received (raw, multipart framing included) and raises ``too_big``
    past ``max_bytes``; refuses an empty upload.
    """
    content_type = request.headers.get("content-type", "")
    form = MultipartFile(content_type, sink) if content_type.startswith("multipart/form-data") else None
    write = form.write if form is not None else sink.write
    received = 0
    async for chunk in request.stream():
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
        with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
            await copy_body(request, spool, max_bytes=limit, too_big=_too_big(settings))
    except TimeoutError:
        spool.close()
        raise UploadTimeoutError(f"the upload did not complete within {settings.request_timeout_s:g} s") from None
    except ClientDisconnect:
        spool.close()
        raise ClientDisconnectedError("client disconnected during the upload") from None
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


def check_request(src: BinaryIO, segmenter: Segmenter, settings: Settings, *, output: str, tile_size: int) -> Admitted:
    """Check the request against every limit from the TIFF header alone (no pixel decoded)."""
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
    header = read_header(src, max_pixels=settings.max_pixels)
    decoded = header.pixels * header.dtype.itemsize
    if decoded > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"image would take {decoded / 2**20:,.0f} MiB decoded ({header.pixels:,} pixels of {header.dtype.name}); "
            f"the limit is {settings.max_image_mb:g} MiB (UNET_MAX_IMAGE_MB)"
        )
    src.seek(0)
    _check_compression(src)
    segmenter.check(header)
    planes = header.pixels // header.channels
    k = segmenter.checkpoint.config.num_classes
    result = planes * (k * 4 if output == "probabilities" else 1)
    if result > settings.max_image_bytes:
        raise ImageTooLargeError(
            f"the {output} result would take {result / 2**20:,.0f} MiB; the limit is "
            f"{settings.max_image_mb:g} MiB (UNET_MAX_IMAGE_MB); ask for output=labels or send a smaller image"
        )
    return Admitted(header, segmenter.count_tiles(header, tile_size))


def _check_compression(src: BinaryIO) -> None:
    with tifffile.TiffFile(src) as tif:
        series = tif.series[0]
        codes = {int(p.compression) for p in series.pages if isinstance(p, tifffile.TiffPage)}
        codes.add(int(series.keyframe.compression))
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

    @property
    def queued(self) -> int:
        return self.admitted - self.running

    def admit(self) -> None:
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
    request: Request, job: Job, executor: Executor, fn: Callable[[], T], on_done: Callable[[], None]
) -> T:
    """Run ``fn`` on ``executor``; cancel ``job`` if the client leaves or time runs out.

    ``on_done`` runs when the worker has really finished (not when this coroutine is
    cancelled), so a device slot is never freed while the device is still busy.
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
    except asyncio.CancelledError:  # server shutdown past its grace period: stop the worker too
        job.cancel(UnavailableError("server shutting down", 1))
        raise
