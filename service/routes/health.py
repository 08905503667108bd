"""``/healthz`` (the process answers) and ``/readyz`` (the model is loaded and warmed up).

Both are exempt from auth and from the segmentation queue, and never touch the model.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import StateDep
from ..http_errors import UnavailableError
from .common import error_responses

__all__ = ["healthz", "readyz", "router"]

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Liveness: the process answers",
    responses=error_responses((503, "too many connections, or shutting down; retry after Retry-After s")),
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: model loaded and warmed up",
    responses=error_responses((503, "not ready: starting or shutting down, or too many connections")),
)
async def readyz(state: StateDep) -> dict[str, Any]:
    if not state.ready:
        raise UnavailableError("not ready: the model is not loaded and warmed up", 1)
    slots = state.slots
    assert slots is not None
    return {"status": "ready", "running": slots.running, "queued": slots.queued, "capacity": slots.capacity}
