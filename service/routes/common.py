"""OpenAPI pieces shared by the routes: the one error body, the upload body and its options.

Every error response is JSON ``{"detail": "<one sentence>"}`` (:mod:`service.http_errors`),
whatever the status, request validation (422) included. :func:`error_responses` documents
that body, a description and the headers that come with it (``Retry-After`` on 503,
``WWW-Authenticate`` on 401) for each status a route lists, so the schema says what the
app really answers; FastAPI's default 422 (``HTTPValidationError``, ``detail`` an array)
is never emitted because every route with parameters lists its own 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, Field

__all__ = [
    "BINARY",
    "TIFF",
    "UPLOAD_DOC",
    "DiameterQuery",
    "ErrorDetail",
    "JobOptionsView",
    "JobProgress",
    "JobView",
    "KeepHolesQuery",
    "MinAreaQuery",
    "OutputQuery",
    "PixelSizeQuery",
    "PreviewClass",
    "PreviewLevel",
    "PreviewView",
    "ScaleView",
    "SegmentOutputQuery",
    "SeriesQuery",
    "TileSizeQuery",
    "error_responses",
    "header",
]

BINARY: dict[str, str] = {"type": "string", "format": "binary"}
TIFF: dict[str, Any] = {"image/tiff": {"schema": BINARY}}
UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the TIFF as the raw body (any Content-Type but multipart/form-data), or as multipart field"
        " `file`; an empty body or one that is not a TIFF gets 415",
        "content": {
            "image/tiff": {"schema": BINARY},
            "application/octet-stream": {"schema": BINARY},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": BINARY}, "required": ["file"]},
                "encoding": {"file": {"contentType": "image/tiff, application/octet-stream"}},
            },
        },
    }
}


class ErrorDetail(BaseModel):
    """The body of every 4xx/5xx response."""

    detail: str = Field(description="what was wrong and what was expected, in one sentence (no paths, no traceback)")


class JobProgress(BaseModel):
    tiles_done: int = Field(ge=0)
    tiles_total: int = Field(ge=0)
    fraction: float = Field(ge=0, le=1)


class JobOptionsView(BaseModel):
    output: Literal["labels", "probabilities", "instances"]
    tile_size: int
    pyramid: bool
    series: int = Field(default=0, ge=0, description="the image series segmented")
    min_area: int | None = Field(default=None, description="instances: the minimum object size asked for (px)")
    preview: bool = Field(default=True, description="whether a zoomable preview is built")
    diameter: str = Field(default="auto", description="the objects' diameter asked for: auto, off or px")
    pixel_size: float | None = Field(default=None, description="µm per px asked for (rescale to the model's)")
    keep_holes: bool = Field(default=False, description="labels: holes inside objects left unfilled")


class ScaleView(BaseModel):
    """The scale an image was segmented at (``service.scale.Scale``)."""

    factor: float = Field(gt=0, description="rescaled size / input size (1: segmented as it is)")
    shape: list[int] = Field(description="(Y, X) of the image the model saw")
    how: Literal["auto", "diameter", "pixel-size", "off", "unknown"] = Field(
        description="auto: estimated from the objects; diameter / pixel-size: from the option; off: never rescaled;"
        " unknown: the checkpoint records no object size"
    )
    diameter_px: float | None = Field(description="the objects' diameter in input px (estimated or given)")
    diameter_um: float | None = Field(description="the same in µm, where the image's pixel size is known")
    passes: int = Field(ge=0, description="segmentations of a crop the estimate took")


class JobView(BaseModel):
    """A job as ``GET /jobs/{id}`` shows it (``JobRecord.public``); documentation only, never used to filter."""

    id: str
    url: str = Field(description="this job's status URL")
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    options: JobOptionsView
    image: dict[str, Any] = Field(
        description="shape, axes and dtype of the uploaded image; series: the one segmented, series_count: how many"
        " the file holds"
    )
    streamed: bool = Field(description="windowed reads and banded output instead of decoding in memory")
    progress: JobProgress
    created: float = Field(description="Unix time")
    started: float | None
    finished: float | None
    elapsed_s: float | None
    eta_s: float | None
    cancel_requested: bool
    error: str | None = Field(description="why the job failed, when it did")
    result_url: str | None = Field(description="set once the state is done")
    result_bytes: int | None
    objects: int | None = Field(description="instances: how many objects were found (set once done)")
    scale: ScaleView | None = Field(default=None, description="the scale it is segmented at, once chosen")
    table_url: str | None = Field(description="instances: the measurement table (CSV), once done")
    geojson_url: str | None = Field(description="instances: the objects' outlines (GeoJSON for QuPath), once done")
    preview_url: str | None = Field(
        default=None, description="the preview's description (levels, classes), once done; null without a preview"
    )
    expires: float | None = Field(description="Unix time the job and its result are deleted (UNET_JOBS_TTL_S)")


class PreviewClass(BaseModel):
    value: int = Field(description="the class value in the mask (instances: 1 = any object)")
    name: str
    rgb: list[int] | None = Field(description="its colour in the overlay; null: not drawn (background)")


class PreviewLevel(BaseModel):
    level: int = Field(ge=0, description="0 = full resolution")
    factor: int = Field(ge=1, description="2**level: image pixels per preview pixel on each axis")
    shape: list[int] = Field(description="[height, width] of the level")
    grid: list[int] = Field(description="[rows, columns] of tiles at the level")


class PreviewView(BaseModel):
    """What a viewer needs to show a job's preview (``GET /jobs/{id}/preview``)."""

    width: int
    height: int
    tile: int = Field(description="tile edge in pixels (edge tiles are smaller)")
    kind: Literal["labels", "instances"]
    classes: list[PreviewClass]
    levels: list[PreviewLevel]
    tiles_url: str = Field(description="template of the tile URLs: replace {level}, {y} and {x}")
    overview_url: str


def header(description: str, schema: dict[str, Any] | None = None, *, required: bool = True) -> dict[str, Any]:
    """One OpenAPI response header."""
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


# What each status means, in any route; a route may say it more precisely (see error_responses).
_DESCRIPTIONS: dict[int, str] = {
    400: "malformed request: a corrupt or truncated TIFF, or a multipart body without exactly one field `file`",
    401: "missing or wrong API key (only when UNET_API_KEY is set): `Authorization: Bearer <key>`",
    404: "no such job (unknown id, deleted, or its result expired)",
    408: "the upload did not finish within UNET_REQUEST_TIMEOUT_S",
    409: "the job has no result: still queued or running, failed, or cancelled",
    413: "too large: the body over UNET_MAX_UPLOAD_MB, or the image (pixels, decoded size, result size, tiles) over"
    " the server's limits",
    415: "the body is empty or not a TIFF",
    422: "invalid option (tile_size, output, series, ...), malformed job id, or an image the model cannot take"
    " (dtype, channels, axes, compression)",
    503: "not now: busy (queue full, too many connections), starting, or shutting down; retry after Retry-After s",
    504: "the segmentation did not finish within UNET_REQUEST_TIMEOUT_S",
    507: "no space left for the upload or its result (disk full, or the jobs quota UNET_JOBS_QUOTA_MB)",
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": header('`Bearer realm="unet-tile"`')},
    503: {"Retry-After": header("seconds to wait before retrying", {"type": "integer", "minimum": 0})},
}


def error_responses(*statuses: int | tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses: the JSON body, a description, the headers.

    A ``(status, description)`` pair says what the status means on this route.

    >>> r = error_responses(404, (503, "busy"))
    >>> sorted(r), r[503]["description"], sorted(r[503]["headers"])
    ([404, 503], 'busy', ['Retry-After'])
    """
    out: dict[int | str, dict[str, Any]] = {}
    for item in statuses:
        status, description = item if isinstance(item, tuple) else (item, _DESCRIPTIONS[item])
        # no "content" here: FastAPI puts the model under application/json (every route's class has no
        # media type of its own or is JSON; a test holds every error to application/json + ErrorDetail)
        entry: dict[str, Any] = {"model": ErrorDetail, "description": description}
        if status in _HEADERS:
            entry["headers"] = _HEADERS[status]
        out[status] = entry
    return out


OutputQuery = Annotated[
    Literal["labels", "probabilities", "instances"],
    Query(
        description="uint8 class ids, float32 per-class probabilities, or uint32 instances (0 = background,"
        " 1..N = objects; jobs also keep their measurement table and GeoJSON outlines)"
    ),
]
SegmentOutputQuery = Annotated[
    Literal["labels", "probabilities", "instances", "table", "geojson"],
    Query(
        description="uint8 class ids, float32 per-class probabilities, uint32 instances (0 = background, 1..N ="
        " objects), or the instances' measurement table (CSV) or outlines (GeoJSON that QuPath imports)"
    ),
]
DiameterQuery = Annotated[
    str,
    Query(
        pattern=r"^(auto|off|[0-9]+(\.[0-9]+)?)$",
        description="the nuclei's typical diameter in px: the image is rescaled so they come out at the model's size"
        " and the result mapped back to the input's shape; auto (default): estimated from a crop, rescaled only when"
        " outside the model's range; off: never rescale. The scale used is in the X-Scale header",
    ),
]
PixelSizeQuery = Annotated[
    float | None,
    Query(gt=0, le=1000, description="µm per px: rescale to the model's pixel size instead (see GET /model)"),
]
KeepHolesQuery = Annotated[
    bool, Query(description="labels: keep holes inside objects (default false: filled, nuclei are simply connected)")
]
MinAreaQuery = Annotated[
    int | None,
    Query(ge=0, description="instances: drop objects smaller than this many pixels (default: the model's minimum)"),
]
# The schema lists the sizes this model and UNET_MAX_TILE_SIZE allow (an enum added by routes.docs once the
# model is loaded); validation stays in the route, whose 422 names the nearest valid sizes.
TileSizeQuery = Annotated[
    int,
    Query(
        description="output tile size: a valid size of the model (16k-60 for depth 4: 388, 644, 900, ...) up to"
        " UNET_MAX_TILE_SIZE; GET /model lists them"
    ),
]
SeriesQuery = Annotated[
    int,
    Query(
        ge=0,
        description="which image series of the file to segment (an OME-TIFF may hold several; pyramid levels are"
        " not series); 422 names how many there are when out of range",
    ),
]
