"""``POST /segment``: a TIFF in, its mask (or probabilities) out, as the CLI would write it."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO

import anyio
from fastapi import APIRouter, Request, Response

from ..deps import SegmenterDep, SettingsDep, StateDep
from ..errors import UnsupportedImageError
from ..http_errors import ClientDisconnectedError, TimeLimitError
from ..io import ImageHeader, encode_tiff, read_image
from ..limits import Job, check_request, receive_upload, run_guarded
from ..metrics import Metrics
from ..segmenter import Segmenter
from ..streaming import segment_file, should_stream
from .common import BINARY, UPLOAD_DOC, OutputQuery, TileSizeQuery

__all__ = ["router", "segment"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["segment"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/tiff": {"schema": BINARY}}, "description": "the mask as a compressed TIFF"},
    400: {"description": "corrupt or truncated TIFF, malformed body"},
    401: {"description": "missing or wrong API key (when UNET_API_KEY is set)"},
    408: {"description": "the upload did not finish within the time limit"},
    413: {"description": "body over UNET_MAX_UPLOAD_MB, or image over UNET_MAX_PIXELS / UNET_MAX_IMAGE_MB"},
    415: {"description": "not a TIFF"},
    422: {"description": "unsupported dtype, channels or compression; invalid tile_size or options"},
    503: {"description": "queue full or model not ready; see Retry-After"},
    504: {"description": "the segmentation did not finish within UNET_REQUEST_TIMEOUT_S"},
}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


@router.post(
    "/segment",
    response_class=Response,
    responses=_RESPONSES,
    openapi_extra=UPLOAD_DOC,
    summary="Segment a TIFF image",
)
async def segment(
    request: Request,
    state: StateDep,
    settings: SettingsDep,
    segmenter: SegmenterDep,
    output: OutputQuery = "labels",
    tile_size: TileSizeQuery = 388,
) -> Response:
    """Segment the uploaded TIFF; the answer has the input's height, width and stack axes.

    Headers: `X-Model-SHA256`, `X-Tiles`, `Server-Timing` (queue, decode, infer, encode).
    """
    assert state.slots is not None and state.executor is not None  # set with the segmenter
    slots, metrics = state.slots, state.metrics
    start = time.monotonic()
    job = Job(start + settings.request_timeout_s, settings.request_timeout_s)
    slots.admit()  # 503 before reading a byte of an upload we cannot serve
    outcome = "error"
    try:
        spool = await receive_upload(request, settings, job.deadline)
        try:
            src = spool.file()
            admitted = await anyio.to_thread.run_sync(
                lambda: check_request(src, segmenter, settings, output=output, tile_size=tile_size)
            )
            header = admitted.header
            queued_at = time.monotonic()
            await slots.acquire(_queue_watch(request, job))
            timings: dict[str, float] = {"queue": time.monotonic() - queued_at}

            streamed = spool.path is not None and should_stream(header, settings.stream_above_mb, output=output)

            def work() -> bytes:
                if streamed:
                    assert spool.path is not None
                    try:
                        return _segment_streamed(
                            segmenter, spool.path, job, metrics, tile_size, settings.max_pixels, timings
                        )
                    except UnsupportedImageError as e:  # header checks passed: only the storage layout is left
                        log.info("streamed path unavailable (%s); decoding in memory", e)
                return _segment(segmenter, src, header, job, metrics, output, tile_size, settings.max_pixels, timings)

            body = await run_guarded(request, job, state.executor, work, slots.release)
        finally:
            spool.close()
        outcome = "ok"
    except BaseException as e:
        outcome = type(e).__name__
        raise
    finally:
        slots.leave()
        metrics.segmentations.labels(outcome).inc()
    planes = header.pixels // header.channels
    metrics.megapixels.inc(planes / 1e6)
    timing = ", ".join(f"{k};dur={_ms(v)}" for k, v in timings.items())
    log.info(
        "segmented %s %s image (%d tiles) in %.2f s [%s]",
        "x".join(map(str, header.shape)),
        header.dtype.name,
        admitted.tiles,
        time.monotonic() - start,
        timing,
    )
    return Response(
        body,
        media_type="image/tiff",
        headers={
            "X-Model-SHA256": segmenter.checkpoint.sha256,
            "X-Tiles": str(admitted.tiles),
            "X-Image-Shape": "x".join(map(str, header.shape)),
            "X-Image-Axes": header.axes,
            "Server-Timing": timing,
            "Content-Disposition": 'attachment; filename="mask.tif"',
        },
    )


def _queue_watch(request: Request, job: Job) -> Callable[[], Awaitable[None]]:
    """What a queued request checks between polls: is the client still there, is there time left?"""

    async def watch() -> None:
        if await request.is_disconnected():
            raise ClientDisconnectedError("client disconnected while queued")
        if time.monotonic() > job.deadline:
            raise TimeLimitError(f"no device slot became free within {job.timeout_s:g} s")

    return watch


def _segment(
    segmenter: Segmenter,
    src: BinaryIO,
    header: ImageHeader,
    job: Job,
    metrics: Metrics,
    output: str,
    tile_size: int,
    max_pixels: int,
    timings: dict[str, float],
) -> bytes:
    """Decode, segment and encode on a worker thread, stopping at the next batch if ``job`` is cancelled."""
    t0 = time.perf_counter()
    job.check()
    image = read_image(src, max_pixels=max_pixels)
    t1 = time.perf_counter()

    def progress(n: int) -> None:
        metrics.tiles.inc(n)
        job.check()

    result = segmenter.segment(image, output=output, tile_size=tile_size, progress=progress)
    del image
    job.check()
    t2 = time.perf_counter()
    data = encode_tiff(header, result)
    timings.update(decode=t1 - t0, infer=t2 - t1, encode=time.perf_counter() - t2)
    return data


def _segment_streamed(
    segmenter: Segmenter,
    path: str,
    job: Job,
    metrics: Metrics,
    tile_size: int,
    max_pixels: int,
    timings: dict[str, float],
) -> bytes:
    """The streamed path for a large upload spooled to disk: windows read from the file,
    labels written band by band to a tiled BigTIFF beside it, whose (compressed) bytes are
    the answer. Memory stays O(tile rows x width) instead of the decoded image."""
    t0 = time.perf_counter()
    job.check()

    def progress(n: int) -> None:
        metrics.tiles.inc(n)
        job.check()

    fd, out = tempfile.mkstemp(dir=os.path.dirname(path), prefix="unet-result-", suffix=".tif")
    os.close(fd)
    try:
        segment_file(segmenter, path, out, tile_size=tile_size, max_pixels=max_pixels, progress=progress)
        t1 = time.perf_counter()
        with open(out, "rb") as f:
            data = f.read()
    finally:
        os.unlink(out)
    timings.update(decode=0.0, infer=t1 - t0, encode=time.perf_counter() - t1)
    return data
