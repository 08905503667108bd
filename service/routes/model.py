"""``GET /model``: what is being served, and the tile sizes a request may ask for."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..admission import valid_tile_sizes
from ..deps import SegmenterDep, SettingsDep
from .common import error_responses

__all__ = ["model", "router"]

router = APIRouter(tags=["model"])


@router.get(
    "/model",
    summary="The loaded model: config, classes, tile geometry, device, precision, sha256",
    responses=error_responses(401, 503),
)
async def model(segmenter: SegmenterDep, settings: SettingsDep) -> dict[str, Any]:
    described = segmenter.describe()
    described["tile_sizes"] = valid_tile_sizes(segmenter.depth, settings.max_tile_size)
    described["limits"] = {
        "max_upload_mb": settings.max_upload_mb,
        "max_pixels": settings.max_pixels,
        "max_image_mb": settings.max_image_mb,
        "max_tile_size": settings.max_tile_size,
        "max_tiles": settings.max_tiles,
        "max_work_per_pixel": settings.max_work_per_pixel,
        "request_timeout_s": settings.request_timeout_s,
        "slots": settings.slots,
        "queue_size": settings.queue_size,
    }
    return described
