"""OpenAPI pieces shared by the routes that take a TIFF upload (``/segment``, ``/jobs``)."""

from __future__ import annotations

from typing import Any

__all__ = ["BINARY", "UPLOAD_DOC"]

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
