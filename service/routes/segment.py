"""``POST /segment``: a TIFF in, its mask (or probabilities) out, as the CLI would write it."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

from ..admission import Admitted, admit, check_scaled
from ..deps import SegmenterDep, SettingsDep, StateDep
from ..errors import OptionError, UnsupportedImageError
from ..http_errors import ClientDisconnectedError, TimeLimitError
from ..metrics import Metrics
from ..pipeline import Options, Output, Route, choose_route, open_sink, resolve
from ..pipeline import segment as run_pipeline
from ..scale import Scale, parse_diameter
from ..segmenter import Segmenter
from ..settings import Settings
from ..sinks import MemorySink
from ..slots import Deadline, run_guarded
from ..sources import TiffSource
from ..upload import Spool, receive_upload
from .common import (
    TIFF,
    UPLOAD_DOC,
    DiameterQuery,
    KeepHolesQuery,
    MinAreaQuery,
    PixelSizeQuery,
    SegmentOutputQuery,
    SeriesQuery,
    TileSizeQuery,
    error_responses,
    header,
)

__all__ = ["router", "segment"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["segment"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            **TIFF,
            "text/csv": {"schema": {"type": "string"}},
            "application/geo+json": {"schema": {"type": "object"}},
        },
        "description": "the mask (uint8 labels), the float32 probabilities or the uint32 instances as a compressed"
        " TIFF with the input's height, width, stack axes and resolution; output=table: one CSV row per object;"
        " output=geojson: a FeatureCollection, one polygon per object",
        "headers": {
            "X-Model-SHA256": header(
                "sha256 of the checkpoint served", {"type": "string", "pattern": "^[0-9a-f]{64}$"}
            ),
            "X-Tiles": header("tiles computed", {"type": "integer", "minimum": 0}),
            "X-Image-Shape": header("the input's shape, e.g. `3x2048x2048`"),
            "X-Image-Axes": header("the input's axes, e.g. `ZYX`"),
            "X-Series": header("the series segmented / how many the file holds, e.g. `0/2`"),
            "Server-Timing": header("queue, decode, infer and encode durations in ms"),
            "X-Object-Count": header(
                "output=instances, table or geojson: the objects found",
                {"type": "integer", "minimum": 0},
                required=False,
            ),
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
    output: SegmentOutputQuery = "labels",
    tile_size: TileSizeQuery = 388,
    series: SeriesQuery = 0,
    min_area: MinAreaQuery = None,
    diameter: DiameterQuery = "auto",
    pixel_size: PixelSizeQuery = None,
    keep_holes: KeepHolesQuery = False,
) -> Response:
    """Segment the uploaded TIFF; the answer has the input's height, width and stack axes.

    Headers: `X-Model-SHA256`, `X-Tiles`, `X-Scale` (the rescale factor, how it was chosen and
    the objects' diameter), `Server-Timing` (queue, decode, infer, encode).

    The work is bounded from the header, before decoding: more than `UNET_MAX_TILES` tiles,
    or more than `UNET_MAX_WORK_PER_PIXEL` network-input pixels per image pixel, gets 422
    when another `tile_size` fits (the message names it), else 413.
    """
    assert state.slots is not None and state.executor is not None  # set with the segmenter
    slots, metrics = state.slots, state.metrics
    start = time.monotonic()
    deadline = Deadline(start + settings.request_timeout_s, settings.request_timeout_s)
    side = output if output in ("table", "geojson") else None
    kind: Output = "instances" if output in ("table", "geojson") else output  # type: ignore[assignment]
    options = Options(
        output=kind,
        tile_size=tile_size,
        series=series,
        min_area=min_area,
        diameter=parse_diameter(diameter),
        pixel_size=pixel_size,
        fill_holes=not keep_holes,
    )
    if min_area is not None and options.output != "instances":
        raise OptionError("min_area applies to output=instances, table or geojson")
    slots.admit()  # 503 before reading a byte of an upload we cannot serve
    outcome = "error"
    try:
        spool = await receive_upload(request, settings, deadline.at)
        try:
            run = await anyio.to_thread.run_sync(lambda: _Run.open(spool, segmenter, settings, options, side))
            try:
                queued_at = time.monotonic()
                await slots.acquire(_queue_watch(request, deadline))
                run.timings["queue"] = time.monotonic() - queued_at
                work = lambda: run.work(segmenter, deadline, metrics)  # noqa: E731
                answer = await run_guarded(request, deadline, state.executor, work, slots.release, slots.check_open)
            finally:
                run.source.close()
        finally:
            spool.close()
        outcome = "ok"
    except BaseException as e:
        outcome = type(e).__name__
        raise
    finally:
        slots.leave()
        metrics.segmentations.labels(outcome).inc()
    head = run.admitted.header
    metrics.pixels.inc(head.pixels // head.channels)
    timing = ", ".join(f"{k};dur={_ms(v)}" for k, v in run.timings.items())
    log.info(
        "segmented %s %s image (%d tiles, %s) in %.2f s [%s]",
        "x".join(map(str, head.shape)),
        head.dtype.name,
        run.tiles,
        "streamed" if run.route.streamed else "in memory",
        time.monotonic() - start,
        timing,
    )
    headers = {
        "X-Model-SHA256": segmenter.checkpoint.sha256,
        "X-Tiles": str(run.tiles),
        "X-Scale": run.scale.header() if run.scale is not None else "1; off",
        "X-Image-Shape": "x".join(map(str, head.shape)),
        "X-Image-Axes": head.axes,
        "X-Series": f"{head.series}/{head.series_count}",
        "Server-Timing": timing,
    }
    if run.objects is not None:
        headers["X-Object-Count"] = str(run.objects)
    if side is not None:
        assert isinstance(answer, Path)
        media, name = ("text/csv", "objects.csv") if side == "table" else ("application/geo+json", "objects.geojson")
        return _TemporaryFileResponse(answer, media_type=media, filename=name, headers=headers)
    if isinstance(answer, Path):
        return _TemporaryFileResponse(answer, media_type="image/tiff", filename="mask.tif", headers=headers)
    headers["Content-Disposition"] = 'attachment; filename="mask.tif"'
    return Response(answer, media_type="image/tiff", headers=headers)


class _TemporaryFileResponse(FileResponse):
    """A streamed answer from a result file, deleted once sent (or when the client leaves)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            Path(self.path).unlink(missing_ok=True)


@dataclass
class _Run:
    """One /segment request once its upload is in: the TIFF opened once, admitted, routed."""

    source: TiffSource
    admitted: Admitted
    route: Route
    options: Options
    spool_dir: str
    side: str | None = None  # "table" or "geojson": answer that, not the image
    timings: dict[str, float] = field(default_factory=dict)
    objects: int | None = None
    scale: Scale | None = None
    tiles: int = 0
    settings: Settings | None = None

    @classmethod
    def open(
        cls, spool: Spool, segmenter: Segmenter, settings: Settings, options: Options, side: str | None = None
    ) -> _Run:
        """Parse the upload once and hold it to every limit (no pixel decoded)."""
        upload = spool.file()  # flushed: a spool on disk is then read through its path (memory maps)
        source = TiffSource(spool.path or upload, max_pixels=settings.max_pixels, series=options.series)
        try:
            header = source.header
            route = choose_route(header, options, stream_above_mb=settings.stream_above_mb)
            admitted = admit(
                header,
                segmenter,
                settings,
                output=options.output,
                tile_size=options.tile_size,
                compressions=source.compressions,
            )
        except BaseException:
            source.close()
            raise
        directory = os.path.dirname(spool.path) if spool.path else str(settings.spool_dir or tempfile.gettempdir())
        return cls(source, admitted, route, options, directory, side, tiles=admitted.tiles, settings=settings)

    def work(self, segmenter: Segmenter, deadline: Deadline, metrics: Metrics) -> bytes | Path:
        """Decode (or open windowed), segment and encode on a worker thread; stops at the next
        tile once ``deadline`` is cancelled. A streamed result is a file, answered from disk."""
        t0 = time.perf_counter()
        deadline.check()
        route = self.route
        if route.read == "windowed":
            try:
                self.source.windowed()
            except UnsupportedImageError as e:  # header checks passed: only the storage layout is left
                log.info("windowed reads unavailable (%s); decoding in memory", e)
                route = Route("decoded", "memory")
        if route.read == "decoded":
            self.source.decoded()
        options = resolve(segmenter, self.source, self.options)  # may segment a crop: the objects' size
        self.scale = options.scale
        if self.scale is not None and self.scale.rescaled:  # held to the same work limits at the scale it runs at
            assert self.settings is not None
            self.tiles = check_scaled(self.source.header, self.scale, segmenter.depth, self.settings, options.tile_size)
        t1 = time.perf_counter()

        def progress(n: int) -> None:
            metrics.tiles.inc(n)
            deadline.check()

        target = side = None
        if route.write != "memory":
            target = self._temporary(".tif")
        try:
            if self.side is not None:  # the image is made (in memory, or a file deleted after), the side file answered
                side = self._temporary(".csv" if self.side == "table" else ".geojson")
                options = replace(options, table=side) if self.side == "table" else replace(options, geojson=side)
            sink = open_sink(route, target, self.source.header, segmenter, options, source=self.source)
            run_pipeline(segmenter, self.source, sink, options, progress)
            deadline.check()
            t2 = time.perf_counter()
            self.objects = getattr(sink, "count", None) if options.output == "instances" else None
            image = getattr(sink, "inner", sink)
            answer: bytes | Path
            if side is not None:
                answer = side
                if target is not None:
                    target.unlink(missing_ok=True)
            else:
                answer = image.encode() if isinstance(image, MemorySink) else target  # type: ignore[assignment]
        except BaseException:
            for path in (target, side):
                if path is not None:
                    path.unlink(missing_ok=True)
            raise
        self.timings.update(decode=t1 - t0, infer=t2 - t1, encode=time.perf_counter() - t2)
        return answer

    def _temporary(self, suffix: str) -> Path:
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="unet-result-", suffix=suffix)
        os.close(fd)
        return Path(name)


def _queue_watch(request: Request, deadline: Deadline) -> Callable[[], Awaitable[None]]:
    """What a queued request checks between polls: is the client still there, is there time left?"""

    async def watch() -> None:
        if await request.is_disconnected():
            raise ClientDisconnectedError("client disconnected while queued")
        if time.monotonic() > deadline.at:
            raise TimeLimitError(f"no device slot became free within {deadline.timeout_s:g} s")

    return watch
