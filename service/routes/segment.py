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
from .common import TIFF, UPLOAD_DOC, OutputQuery, SeriesQuery, TileSizeQuery, error_responses, header

__all__ = ["router", "segment"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["segment"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": TIFF,
        "description": "the mask (uint8 labels) or the float32 probabilities as a compressed TIFF with the input's"
        " height, width, stack axes and resolution",
        "headers": {
            "X-Model-SHA256": header(
                "sha256 of the checkpoint served", {"type": "string", "pattern": "^[0-9a-f]{64}$"}
            ),
            "X-Tiles": header("tiles computed", {"type": "integer", "minimum": 0}),
            "X-Image-Shape": header("the input's shape, e.g. `3x2048x2048`"),
            "X-Image-Axes": header("the input's axes, e.g. `ZYX`"),
            "X-Series": header("the series segmented / how many the file holds, e.g. `0/2`"),
            "Server-Timing": header("queue, decode, infer and encode durations in ms"),
            "Content-Disposition": header('`attachment; filename="mask.tif"`'),
        },
    },
    **error_responses(
        400,
        401,
        (408, "the upload did not finish within UNET_REQUEST_TIMEOUT_S"),
        413,
        415,
        422,
        (503, "busy (queue full, too many connections), starting, or shutting down; retry after Retry-After s"),
        504,
        (507, "no disk space left to spool the upload or write the result"),
    ),
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
    series: SeriesQuery = 0,
) -> Response:
    """Segment the uploaded TIFF; the answer has the input's height, width and stack axes.

    Headers: `X-Model-SHA256`, `X-Tiles`, `Server-Timing` (queue, decode, infer, encode).

    The work is bounded from the header, before decoding: more than `UNET_MAX_TILES` tiles,
    or more than `UNET_MAX_WORK_PER_PIXEL` network-input pixels per image pixel, gets 422
    when another `tile_size` fits (the message names it), else 413.
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
                lambda: check_request(src, segmenter, settings, output=output, tile_size=tile_size, series=series)
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
                            segmenter, spool.path, job, metrics, tile_size, settings.max_pixels, timings, series
                        )
                    except UnsupportedImageError as e:  # header checks passed: only the storage layout is left
                        log.info("streamed path unavailable (%s); decoding in memory", e)
                return _segment(segmenter, src, header, job, metrics, output, tile_size, settings.max_pixels, timings)

            body = await run_guarded(request, job, state.executor, work, slots.release, slots.check_open)
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
            "X-Series": f"{header.series}/{header.series_count}",
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
    image = read_image(src, max_pixels=max_pixels, series=header.series)
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
    series: int = 0,
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
        segment_file(segmenter, path, out, tile_size=tile_size, max_pixels=max_pixels, progress=progress, series=series)
        t1 = time.perf_counter()
        with open(out, "rb") as f:
            data = f.read()
    finally:
        os.unlink(out)
    timings.update(decode=0.0, infer=t1 - t0, encode=time.perf_counter() - t1)
    return data
