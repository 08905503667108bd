"""``/jobs``: segment big images in the background; submit, poll, download, cancel.

``POST /jobs`` takes the same body (raw TIFF or multipart field ``file``) and options as
``POST /segment`` and answers 202 at once with the job's id and URL; the upload is
streamed straight into the jobs directory. ``GET /jobs/{id}`` shows the state and the
progress (tiles done/total, elapsed, ETA), ``GET /jobs/{id}/result`` the mask, and
``DELETE /jobs/{id}`` cancels a queued or running job or deletes a finished one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from starlette.requests import ClientDisconnect

from ..deps import SegmenterDep, SettingsDep
from ..errors import InputError, UnsupportedImageError
from ..http_errors import ClientDisconnectedError
from ..io import read_header
from ..jobs import (
    JOB_ID_PATTERN,
    InvalidJobIdError,
    JobError,
    JobNotFoundError,
    JobNotReadyError,
    JobOptions,
    JobRecord,
    JobWorker,
    QuotaExceededError,
)
from ..limits import Spool, check_request, copy_body
from ..segmenter import Segmenter
from ..settings import Settings
from .common import BINARY, UPLOAD_DOC, OutputQuery, TileSizeQuery

__all__ = ["delete_job", "job_result", "job_status", "router", "submit_job"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

_STATUS = {InvalidJobIdError: 422, JobNotFoundError: 404, JobNotReadyError: 409, QuotaExceededError: 507}
JobId = Annotated[str, PathParam(pattern=JOB_ID_PATTERN, description="the id returned by POST /jobs")]


def _http(e: JobError) -> HTTPException:
    return HTTPException(_STATUS.get(type(e), 400), str(e))


def _worker(request: Request) -> JobWorker:
    worker: JobWorker | None = getattr(request.app.state, "jobs", None)
    if worker is None:
        raise HTTPException(503, "the job worker is not running (starting or shutting down); retry later")
    return worker


class _FileSink(Spool):
    """Upload bytes written straight to the job's input file, under the quota."""

    def __init__(self, path: Path, room: int, quota_error: QuotaExceededError) -> None:
        super().__init__(threshold=0, directory=path.parent)
        self._buf = open(path, "wb")  # noqa: SIM115  (closed by close())
        self.on_disk = True
        self.room, self.quota_error = room, quota_error

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.room:
            raise self.quota_error
        self._buf.write(data)


async def _receive(request: Request, path: Path, room: int, worker: JobWorker) -> int:
    """Stream the body (raw or multipart field ``file``) into ``path``; returns its size."""
    quota_error = QuotaExceededError(
        f"the upload does not fit in the jobs storage ({room / 2**20:,.1f} MiB free of "
        f"{worker.store.quota_bytes / 2**20:,.0f} MiB, UNET_JOBS_QUOTA_MB); DELETE finished jobs or retry later"
    )
    sink = _FileSink(path, room, quota_error)
    try:
        await copy_body(request, sink)
    except ClientDisconnect:
        raise ClientDisconnectedError("client disconnected during the upload") from None
    finally:
        sink.close()
    return sink.size


def _admit(path: Path, segmenter: Segmenter, settings: Settings, worker: JobWorker, options: JobOptions) -> JobRecord:
    """Check the upload like ``/segment`` does, from its header; streamed jobs may be larger."""
    if options.pyramid and options.output != "labels":
        raise InputError("pyramid=true applies to output=labels, not probabilities")
    header = read_header(path)
    if options.pyramid and header.stack_axes:
        raise UnsupportedImageError(f"pyramid=true needs a single 2-D image; this one has axes {header.axes}")
    streamed = worker.decide_streamed(header, options)
    limits = settings
    if streamed:  # windowed reads, banded output: the in-memory size limit does not apply
        limits = settings.model_copy(update={"max_pixels": worker.max_pixels or 2**62, "max_image_mb": 2.0**40})
    with open(path, "rb") as f:
        admitted = check_request(f, segmenter, limits, output=options.output, tile_size=options.tile_size)
    return JobRecord(
        id=path.parent.name,
        options=options,
        tiles_total=admitted.tiles,
        image={"shape": list(header.shape), "axes": header.axes, "dtype": header.dtype.name},
        streamed=streamed,
        input_bytes=path.stat().st_size,
    )


@router.post(
    "",
    status_code=202,
    openapi_extra=UPLOAD_DOC,
    summary="Submit a TIFF for segmentation in the background",
    responses={
        202: {"description": "queued; poll the URL in `url` / the Location header"},
        413: {"description": "image over the pixel limit"},
        415: {"description": "not a TIFF"},
        422: {"description": "unsupported image or options"},
        503: {"description": "model or job worker not ready"},
        507: {"description": "jobs storage quota exceeded"},
    },
)
async def submit_job(
    request: Request,
    settings: SettingsDep,
    segmenter: SegmenterDep,
    output: OutputQuery = "labels",
    tile_size: TileSizeQuery = 388,
    pyramid: Annotated[bool, Query(description="labels as a pyramidal OME-TIFF (streamed)")] = False,
) -> JSONResponse:
    worker = _worker(request)
    store = worker.store
    options = JobOptions(output=output, tile_size=tile_size, pyramid=pyramid)
    used = await anyio.to_thread.run_sync(store.usage_bytes)
    declared = request.headers.get("content-length", "")
    try:
        if declared.isdigit():  # refuse before reading a byte (curl waits on 100-continue)
            store.check_quota(int(declared), used=used)
        job_id = store.create_dir()
    except JobError as e:
        raise _http(e) from None
    path = store.input_path(job_id)
    try:
        await _receive(request, path, store.quota_bytes - used, worker)
        record = await anyio.to_thread.run_sync(lambda: _admit(path, segmenter, settings, worker, options))
        worker.submit(record)
    except JobError as e:
        store.delete(job_id)
        raise _http(e) from None
    except BaseException:
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


@router.get("/{job_id}", summary="State and progress of a job")
async def job_status(request: Request, job_id: JobId) -> dict[str, Any]:
    worker = _worker(request)
    try:
        record = await anyio.to_thread.run_sync(worker.store.load, job_id)
    except JobError as e:
        raise _http(e) from None
    return record.public(worker.store.ttl_s)


@router.get(
    "/{job_id}/result",
    response_class=FileResponse,
    summary="Download the mask of a finished job",
    responses={200: {"content": {"image/tiff": {"schema": BINARY}}}, 409: {"description": "not done"}},
)
async def job_result(request: Request, job_id: JobId) -> FileResponse:
    worker = _worker(request)
    try:
        record = await anyio.to_thread.run_sync(worker.store.load, job_id)
        if record.state != "done":
            detail = f"job is {record.state}"
            if record.state in ("queued", "running"):
                detail += f" ({record.tiles_done}/{record.tiles_total} tiles); poll /jobs/{job_id} until state is done"
            elif record.error:
                detail += f": {record.error}"
            raise JobNotReadyError(detail)
    except JobError as e:
        raise _http(e) from None
    name = "mask.ome.tif" if record.options.pyramid else "mask.tif"
    return FileResponse(
        worker.store.result_path(job_id),
        media_type="image/tiff",
        filename=name,
        headers={
            "X-Tiles": str(record.tiles_total),
            "X-Image-Shape": "x".join(map(str, record.image.get("shape", []))),
        },
    )


@router.delete(
    "/{job_id}",
    summary="Cancel a queued or running job, or delete a finished one",
    responses={
        200: {"description": "queued job cancelled"},
        202: {"description": "running job: cancel requested"},
        204: {"description": "deleted"},
    },
)
async def delete_job(request: Request, job_id: JobId) -> Response:
    worker = _worker(request)
    try:
        record = await anyio.to_thread.run_sync(worker.store.load, job_id)
        if record.state in ("queued", "running"):
            record = await anyio.to_thread.run_sync(worker.cancel, job_id)
            status_code = 202 if record.state == "running" else 200
            return JSONResponse(record.public(worker.store.ttl_s), status_code=status_code)
        await anyio.to_thread.run_sync(worker.store.delete, job_id)
    except JobError as e:
        raise _http(e) from None
    log.info("job %s deleted", job_id)
    return Response(status_code=204)
