"""``/jobs``: segment big images in the background; submit, poll, download, cancel.

``POST /jobs`` takes the same body (raw TIFF or multipart field ``file``) and options as
``POST /segment`` and answers 202 at once with the job's id and URL; the upload is
streamed straight into the jobs directory. ``GET /jobs/{id}`` shows the state and the
progress (tiles done/total, elapsed, ETA), ``GET /jobs/{id}/result`` the mask, and
``DELETE /jobs/{id}`` cancels a queued or running job or deletes a finished one. A finished
job also has its preview (:mod:`service.preview`, built while it ran): ``/preview`` (levels,
classes), ``/preview.png`` (one overview) and ``/tiles/{level}/{y}/{x}.png`` (for zooming).

Job errors propagate to :mod:`service.http_errors`, which maps them to status codes (404,
409, 422, 507) with everything else. An upload has a time limit overall
(``UNET_JOBS_UPLOAD_TIMEOUT_S``) and between two chunks (``UNET_JOBS_UPLOAD_IDLE_S``): past
either, 408 and the partial upload is deleted; a disk that fills up during it gets 507.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse

from ..admission import admit
from ..deps import SegmenterDep, SettingsDep
from ..errors import (
    JobNotReadyError,
    JobsOffError,
    OptionError,
    QuotaExceededError,
    UnsupportedImageError,
    storage_error,
)
from ..http_errors import UnavailableError
from ..jobs import JOB_ID_PATTERN, JobOptions, JobRecord, JobWorker
from ..pipeline import choose_route
from ..preview import Layer, Preview, Style
from ..segmenter import Segmenter
from ..settings import Settings
from ..sources import TiffSource
from ..upload import Spool, copy_body
from .common import (
    BINARY,
    TIFF,
    UPLOAD_DOC,
    DiameterQuery,
    JobView,
    KeepHolesQuery,
    MinAreaQuery,
    OutputQuery,
    PixelSizeQuery,
    PreviewView,
    SeriesQuery,
    TileSizeQuery,
    error_responses,
    header,
)

__all__ = [
    "delete_job",
    "job_geojson",
    "job_preview",
    "job_preview_png",
    "job_result",
    "job_status",
    "job_table",
    "job_tile",
    "router",
    "submit_job",
]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="the id returned by POST /jobs")]
# what every /jobs/{id} route may answer besides its own success
_BY_ID_ERRORS = error_responses(
    401,
    404,
    (422, "malformed job id: expected 32 characters of A-Z, a-z, 0-9, '_' or '-'"),
    (
        503,
        "the job worker is not running (starting or shutting down), or too many connections: retry after Retry-After"
        " s; or /jobs is off on this server (no Retry-After; the message says why)",
    ),
)


def _worker(request: Request) -> JobWorker:
    worker: JobWorker | None = getattr(request.app.state, "jobs", None)
    if worker is None:
        off: str | None = getattr(request.app.state, "jobs_off", None)
        if off is not None:
            raise JobsOffError(f"/jobs is off on this server: {off}")
        raise UnavailableError("the job worker is not running (starting or shutting down); retry later", 1)
    return worker


class _FileSink(Spool):
    """Upload bytes written straight to the job's input file, under the quota; a full disk is 507."""

    doing = "writing the upload to the jobs storage"

    def __init__(self, path: Path, room: int, quota_error: QuotaExceededError) -> None:
        super().__init__(threshold=0, directory=path.parent)
        try:
            self._buf = open(path, "wb")  # noqa: SIM115  (closed by close())
        except OSError as e:
            raise storage_error(e, self.doing) from None
        self.on_disk = True
        self.room, self.quota_error = room, quota_error

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.room:
            raise self.quota_error
        try:
            self._buf.write(data)
        except OSError as e:
            raise storage_error(e, self.doing) from None


async def _receive(request: Request, path: Path, room: int, worker: JobWorker, settings: Settings) -> int:
    """Stream the body (raw or multipart field ``file``) into ``path``, within the upload's time
    limits; returns its size. On any error the caller deletes the job directory."""
    quota_error = QuotaExceededError(
        f"the upload does not fit in the jobs storage ({room / 2**20:,.1f} MiB free of "
        f"{worker.store.quota_bytes / 2**20:,.0f} MiB, UNET_JOBS_QUOTA_MB); DELETE finished jobs or retry later"
    )
    sink = _FileSink(path, room, quota_error)
    limit = settings.jobs_upload_timeout_s
    try:
        await copy_body(
            request,
            sink,
            idle_s=settings.jobs_upload_idle_s,
            within_s=limit,
            time_limit=f"{limit:g} s (UNET_JOBS_UPLOAD_TIMEOUT_S)",
        )
        sink.file()  # flushed here, so a disk that is full for the last bytes is 507, not a truncated input
    finally:
        sink.close()
    return sink.size


def _admit(path: Path, segmenter: Segmenter, settings: Settings, worker: JobWorker, options: JobOptions) -> JobRecord:
    """Check the upload like ``/segment`` does, from its header parsed once; streamed jobs may be larger."""
    most = max(settings.max_pixels, settings.jobs_max_pixels)  # before the segments are read; admit() decides which
    with TiffSource(path, max_pixels=most, series=options.series) as source:
        header = source.header
        route = choose_route(
            header, options.pipeline, stream_above_mb=worker.stream_above_mb, zarr_out=options.format == "ome-zarr"
        )
        if options.pyramid and header.stack_axes:
            raise UnsupportedImageError(f"pyramid=true needs a single 2-D image; this one has axes {header.axes}")
        admitted = admit(
            header,
            segmenter,
            settings,
            output=options.output,
            tile_size=options.tile_size,
            compressions=source.compressions,
            jobs=True,
            streamed=route.streamed,
        )
    return JobRecord(
        id=path.parent.name,
        options=options,
        tiles_total=admitted.tiles,
        image={
            "shape": list(header.shape),
            "axes": header.axes,
            "dtype": header.dtype.name,
            "series": header.series,
            "series_count": header.series_count,
        },
        streamed=route.streamed,
        route=asdict(route),
        input_bytes=path.stat().st_size,
    )


@router.post(
    "",
    status_code=202,
    openapi_extra=UPLOAD_DOC,
    summary="Submit a TIFF for segmentation in the background",
    responses={
        202: {
            "model": JobView,
            "description": "queued; poll the URL in `url` (also the Location header)",
            "headers": {"Location": header("the job's status URL, `/jobs/{id}`")},
            "links": {
                name: {"operationRef": ref, "parameters": {"job_id": "$response.body#/id"}}
                for name, ref in (
                    ("status", "#/paths/~1jobs~1%7Bjob_id%7D/get"),
                    ("result", "#/paths/~1jobs~1%7Bjob_id%7D~1result/get"),
                    ("cancel", "#/paths/~1jobs~1%7Bjob_id%7D/delete"),
                )
            },
        },
        **error_responses(
            400,
            401,
            (408, "the upload did not finish within UNET_JOBS_UPLOAD_TIMEOUT_S, or stalled UNET_JOBS_UPLOAD_IDLE_S"),
            (413, "too large: the image (pixels, decoded size, result size), or more tiles than UNET_JOBS_MAX_TILES"),
            415,
            (
                422,
                "invalid option (tile_size, output, series, pyramid with probabilities or a stack, ...), or an"
                " image the model cannot take (dtype, channels, axes, compression)",
            ),
            (
                503,
                "the model or the job worker is not running (starting or shutting down), or too many"
                " connections: retry after Retry-After s; or /jobs is off on this server (no Retry-After;"
                " the message says why)",
            ),
            (507, "no space left for the upload: the jobs quota UNET_JOBS_QUOTA_MB, or the disk, is full"),
        ),
    },
)
async def submit_job(
    request: Request,
    settings: SettingsDep,
    segmenter: SegmenterDep,
    output: OutputQuery = "labels",
    tile_size: TileSizeQuery = 388,
    pyramid: Annotated[bool, Query(description="labels as a pyramidal OME-TIFF (streamed)")] = False,
    series: SeriesQuery = 0,
    format: Annotated[
        Literal["tiff", "ome-zarr"],
        Query(description="the result: a TIFF, or an OME-Zarr store (labels; downloaded as a zip of the store)"),
    ] = "tiff",
    min_area: MinAreaQuery = None,
    diameter: DiameterQuery = "auto",
    pixel_size: PixelSizeQuery = None,
    keep_holes: KeepHolesQuery = False,
    preview: Annotated[
        bool, Query(description="build the zoomable preview: /jobs/{id}/preview.png and /jobs/{id}/tiles/...")
    ] = True,
) -> JSONResponse:
    """Queue the uploaded TIFF as a job: 202 with its id and URL.

    Held to the work limits of `/segment`, with `UNET_JOBS_MAX_TILES` tiles: 422 when another
    `tile_size` fits (the message names it), else 413. A job still running `UNET_JOBS_TIMEOUT_S`
    after it started ends `failed`.
    """
    worker = _worker(request)
    store = worker.store
    if min_area is not None and output != "instances":
        raise OptionError("min_area applies to output=instances")
    options = JobOptions(
        output=output,
        tile_size=tile_size,
        pyramid=pyramid,
        series=series,
        format=format,
        min_area=min_area,
        preview=preview,
        diameter=diameter,
        pixel_size=pixel_size,
        keep_holes=keep_holes,
    )
    used = await anyio.to_thread.run_sync(store.usage_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit():  # refuse before reading a byte (curl waits on 100-continue)
        store.check_quota(int(declared), used=used)
    job_id = store.create_dir()
    path = store.input_path(job_id)
    try:
        await _receive(request, path, store.quota_bytes - used, worker, settings)
        record = await anyio.to_thread.run_sync(lambda: _admit(path, segmenter, settings, worker, options))
        worker.submit(record)
    except BaseException:  # quota, disk full, time limit, bad image, client gone: no partial upload left
        store.delete(job_id)
        raise
    log.info(
        "job %s queued: %s, %d tiles, %s path",
        job_id,
        record.image,
        record.tiles_total,
        "streamed" if record.streamed else "in-memory",
    )
    body = record.public(store.ttl_s)
    return JSONResponse(body, status_code=202, headers={"Location": body["url"]})


@router.get(
    "/{job_id}",
    summary="State and progress of a job",
    responses={200: {"model": JobView, "description": "the job"}, **_BY_ID_ERRORS},
)
async def job_status(request: Request, job_id: JobId) -> dict[str, Any]:
    worker = _worker(request)
    record = await anyio.to_thread.run_sync(worker.store.load, job_id)
    return record.public(worker.store.ttl_s)


@router.get(
    "/{job_id}/result",
    response_class=FileResponse,
    summary="Download the mask of a finished job",
    responses={
        200: {
            "content": {**TIFF, "application/zip": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the mask as a compressed TIFF (a pyramidal OME-TIFF with pyramid=true), or with"
            " format=ome-zarr a zip of the OME-Zarr store (image and labels/unet)",
            "headers": {
                "X-Tiles": header("tiles computed", {"type": "integer", "minimum": 0}),
                "X-Image-Shape": header("the input's shape, e.g. `2048x2048`"),
                "Content-Disposition": header(
                    '`attachment; filename="mask.tif"` (or `mask.ome.tif`, `mask.ome.zarr.zip`)'
                ),
            },
        },
        **_BY_ID_ERRORS,
        **error_responses(409),
    },
)
async def job_result(request: Request, job_id: JobId) -> FileResponse:
    worker = _worker(request)
    record = await anyio.to_thread.run_sync(worker.store.load, job_id)
    _check_done(record)
    fmt = record.options.format
    if fmt == "ome-zarr":
        name, media_type = "mask.ome.zarr.zip", "application/zip"
    else:
        name, media_type = ("mask.ome.tif" if record.options.pyramid else "mask.tif"), "image/tiff"
    return FileResponse(
        worker.store.result_path(job_id, fmt),
        media_type=media_type,
        filename=name,
        headers={
            "X-Tiles": str(record.tiles_total),
            "X-Image-Shape": "x".join(map(str, record.image.get("shape", []))),
        },
    )


def _check_done(record: JobRecord) -> None:
    if record.state != "done":
        detail = f"job is {record.state}"
        if record.state in ("queued", "running"):
            detail += f" ({record.tiles_done}/{record.tiles_total} tiles); poll /jobs/{record.id} until state is done"
        elif record.error:
            detail += f": {record.error}"
        raise JobNotReadyError(detail)


def _side_file(request: Request, job_id: str, which: Literal["table", "geojson"]) -> FileResponse:
    worker = _worker(request)
    record = worker.store.load(job_id)
    _check_done(record)
    if record.options.output != "instances":
        raise JobNotReadyError(f"job {job_id} made {record.options.output}: a {which} comes with output=instances")
    if which == "table":
        path, media, name = worker.store.table_path(job_id), "text/csv", "objects.csv"
    else:
        path, media, name = worker.store.geojson_path(job_id), "application/geo+json", "objects.geojson"
    return FileResponse(path, media_type=media, filename=name, headers={"X-Object-Count": str(record.objects or 0)})


_SIDE_HEADERS = {
    "X-Object-Count": header("objects found", {"type": "integer", "minimum": 0}),
    "Content-Disposition": header('`attachment; filename="objects.csv"` (or `objects.geojson`)'),
}


@router.get(
    "/{job_id}/table",
    response_class=FileResponse,
    summary="Download the measurement table of a finished instances job",
    responses={
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "one row per object: id, area, centroid, bounding box, intensities (see the README)",
            "headers": _SIDE_HEADERS,
        },
        **_BY_ID_ERRORS,
        **error_responses((409, "the job has no table: not done yet, failed, cancelled, or not output=instances")),
    },
)
async def job_table(request: Request, job_id: JobId) -> FileResponse:
    return await anyio.to_thread.run_sync(_side_file, request, job_id, "table")


@router.get(
    "/{job_id}/geojson",
    response_class=FileResponse,
    summary="Download the object outlines of a finished instances job (GeoJSON for QuPath)",
    responses={
        200: {
            "content": {"application/geo+json": {"schema": {"type": "object"}}},
            "description": "a FeatureCollection: one polygon per object, QuPath detections, full-resolution pixels",
            "headers": _SIDE_HEADERS,
        },
        **_BY_ID_ERRORS,
        **error_responses((409, "the job has no outlines: not done yet, failed, cancelled, or not output=instances")),
    },
)
async def job_geojson(request: Request, job_id: JobId) -> FileResponse:
    return await anyio.to_thread.run_sync(_side_file, request, job_id, "geojson")


def _preview(request: Request, job_id: str) -> Preview:
    worker = _worker(request)
    record = worker.store.load(job_id)
    _check_done(record)
    if not record.has_preview:
        why = "it was submitted with preview=false" if not record.options.preview else "it ran on a Dask cluster"
        raise JobNotReadyError(f"job {job_id} has no preview: {why}")
    path = worker.store.preview_path(job_id)
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise JobNotReadyError(f"job {job_id} has no preview: it was removed") from None
    return _open_preview(str(path), stamp)


@functools.lru_cache(maxsize=16)
def _open_preview(path: str, stamp: int) -> Preview:
    """A preview's index, parsed once per file (a viewer asks for many tiles of the same one)."""
    return Preview(path)


_PREVIEW_ERRORS = error_responses(
    (409, "the job has no preview: not done yet, failed, cancelled, submitted with preview=false, or run on a cluster")
)
_PNG = {"image/png": {"schema": BINARY}}


@router.get(
    "/{job_id}/preview",
    summary="Describe a finished job's preview: size, zoom levels, tile URLs and class colours",
    responses={200: {"model": PreviewView, "description": "the preview"}, **_BY_ID_ERRORS, **_PREVIEW_ERRORS},
)
async def job_preview(request: Request, job_id: JobId) -> dict[str, Any]:
    preview = await anyio.to_thread.run_sync(_preview, request, job_id)
    return {
        **preview.describe(),
        "tiles_url": f"/jobs/{job_id}/tiles/{{level}}/{{y}}/{{x}}.png",
        "overview_url": f"/jobs/{job_id}/preview.png",
    }


@router.get(
    "/{job_id}/preview.png",
    response_class=Response,
    summary="The whole image with the mask's outlines (or fill) as one PNG, at most max_size on a side",
    responses={
        200: {
            "content": _PNG,
            "description": "the input contrast-stretched as the model saw it (the fitted normalization's window),"
            " from the finest pyramid level that fits in max_size, with the mask drawn in its class colours",
        },
        **_BY_ID_ERRORS,
        **_PREVIEW_ERRORS,
    },
)
async def job_preview_png(
    request: Request,
    job_id: JobId,
    max_size: Annotated[int, Query(ge=256, le=4096, description="longest side at most (px)")] = 1024,
    style: Annotated[
        Style, Query(description="outline: class-coloured outlines; fill: the classes filled; none: the image")
    ] = "outline",
    opacity: Annotated[float, Query(ge=0.0, le=1.0, description="of the outlines or the fill")] = 1.0,
) -> Response:
    def render() -> bytes:
        return _preview(request, job_id).overview(max_size, style, opacity)

    png = await anyio.to_thread.run_sync(render)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/{job_id}/tiles/{level}/{y}/{x}.png",
    response_class=Response,
    summary="One 256 x 256 tile of a finished job's preview pyramid",
    responses={
        200: {
            "content": _PNG,
            "description": "overlay: the image with outlines (RGB); image: the image alone (RGB); outline and"
            " fill: the mask alone (RGBA, transparent elsewhere), for a viewer that blends them itself",
        },
        **_BY_ID_ERRORS,
        **error_responses((404, "no such job, or the level or tile is outside the preview (see /jobs/{id}/preview)")),
        **_PREVIEW_ERRORS,
    },
)
async def job_tile(
    request: Request,
    job_id: JobId,
    level: Annotated[int, PathParam(ge=0, le=64, description="0 = full resolution, k = 2**k times smaller")],
    y: Annotated[int, PathParam(ge=0, description="tile row")],
    x: Annotated[int, PathParam(ge=0, description="tile column")],
    layer: Annotated[Layer, Query(description="what the tile shows")] = "overlay",
) -> Response:
    def render() -> bytes:
        return _preview(request, job_id).tile(level, y, x, layer)

    png = await anyio.to_thread.run_sync(render)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.delete(
    "/{job_id}",
    summary="Cancel a queued or running job, or delete a finished one",
    responses={
        200: {"model": JobView, "description": "a queued job: cancelled"},
        202: {"model": JobView, "description": "a running job: cancel requested; it stops at its next batch"},
        204: {"description": "a finished job: deleted, with its result"},
        **_BY_ID_ERRORS,
        **error_responses((507, "no space left on the jobs storage to record the cancel")),
    },
)
async def delete_job(request: Request, job_id: JobId) -> Response:
    worker = _worker(request)
    record = await anyio.to_thread.run_sync(worker.store.load, job_id)
    if record.state in ("queued", "running"):
        record = await anyio.to_thread.run_sync(worker.cancel, job_id)
        status_code = 202 if record.state == "running" else 200
        return JSONResponse(record.public(worker.store.ttl_s), status_code=status_code)
    await anyio.to_thread.run_sync(worker.store.delete, job_id)
    log.info("job %s deleted", job_id)
    return Response(status_code=204)
