"""Receiving an upload: the body counted while it arrives, raw or as multipart field ``file``.

* :class:`Spool`: in memory up to a threshold, then in a named temporary file;
* :class:`MultipartFile`: a multipart/form-data body parsed as it streams, keeping field ``file``;
* :func:`copy_body`: the body into a sink, within a byte limit and the upload's time limits;
* :func:`receive_upload`: ``POST /segment``'s upload, held to ``UNET_MAX_UPLOAD_MB`` (the
  Content-Length is only an early hint: the bytes are counted) and to the request's deadline.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from .errors import ImageTooLargeError, InputError, NotATiffError, storage_error
from .http_errors import ClientDisconnectedError, UploadTimeoutError
from .settings import Settings

__all__ = ["MultipartFile", "Spool", "copy_body", "receive_upload"]

log = logging.getLogger(__name__)


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
    """The uploaded TIFF (raw body, or multipart field ``file``), size-limited while streaming.

    ``deadline``: the request's :func:`time.monotonic` deadline, which the whole upload must meet.
    """
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
