"""``/openapi.json`` and ``/docs``, behind the API key like every route but the health checks.

The schema is FastAPI's, made to describe this server: the tile sizes the loaded model can
take up to ``UNET_MAX_TILE_SIZE``, as an ``enum`` on every ``tile_size`` parameter (the
route still validates the value itself, so a wrong one gets a 422 naming the nearest valid
sizes rather than the whole list), and the API key only where ``UNET_API_KEY`` is set.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from ..admission import valid_tile_sizes
from ..deps import ServiceState, StateDep
from .common import error_responses

__all__ = ["docs", "openapi", "router", "service_openapi"]

router = APIRouter(tags=["docs"])

_ERRORS = error_responses(401, (503, "too many connections, or shutting down; retry after Retry-After s"))


def service_openapi(app: FastAPI, state: ServiceState) -> dict[str, Any]:
    """The schema served at ``/openapi.json``: this server's, built once the model is there, then cached.

    Without ``UNET_API_KEY`` no route needs a key, so the bearer scheme and the 401s go.
    """
    cached: dict[str, Any] | None = getattr(app.state, "openapi_schema", None)
    if cached is not None:
        return cached
    schema = copy.deepcopy(app.openapi())
    operations = [op for item in schema["paths"].values() for op in item.values()]
    if state.settings.api_key is None:
        schema.get("components", {}).pop("securitySchemes", None)
        for operation in operations:
            operation.pop("security", None)
            operation["responses"].pop("401", None)
    if state.segmenter is None:  # not loaded yet (never the case once the server accepts connections)
        return schema
    sizes = valid_tile_sizes(state.segmenter.depth, state.settings.max_tile_size)
    for operation in operations:
        for param in operation.get("parameters", []):
            if param["name"] == "tile_size" and param["in"] == "query":
                param["schema"]["enum"] = sizes
                param["description"] = param["schema"]["description"] = (
                    f"output tile size: one of the {len(sizes)} sizes this model takes up to UNET_MAX_TILE_SIZE="
                    f"{state.settings.max_tile_size} ({sizes[0]}, {sizes[1]}, ... {sizes[-1]}; GET /model lists them)"
                )
    app.state.openapi_schema = schema
    return schema


@router.get(
    "/openapi.json",
    summary="This OpenAPI schema",
    responses={200: {"description": "the OpenAPI 3.1 schema of this server"}, **_ERRORS},
)
async def openapi(request: Request, state: StateDep) -> JSONResponse:
    return JSONResponse(service_openapi(request.app, state))


@router.get(
    "/docs",
    response_class=Response,  # not HTMLResponse: its media type would be given to the JSON error bodies too
    summary="Swagger UI for this schema",
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "Swagger UI"}, **_ERRORS},
)
async def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")
