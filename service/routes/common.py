"""Query parameters and OpenAPI pieces shared by the routes that take a TIFF upload (``/segment``, ``/jobs``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query

__all__ = ["BINARY", "UPLOAD_DOC", "OutputQuery", "TileSizeQuery"]

BINARY: dict[str, str] = {"type": "string", "format": "binary"}
UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the TIFF as the raw body, or as multipart field `file`",
        "content": {
            "image/tiff": {"schema": BINARY},
            "application/octet-stream": {"schema": BINARY},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": BINARY}, "required": ["file"]}},
        },
    }
}

OutputQuery = Annotated[
    Literal["labels", "probabilities"], Query(description="uint8 class ids or float32 per-class probabilities")
]
TileSizeQuery = Annotated[int, Query(description="output tile size: 388, 644, 900, ... (16k-60 for depth 4)")]
