"""API key on: every route but /healthz and /readyz needs ``Authorization: Bearer <key>``.
The same server has a 2-second request time limit."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.service.conftest import LONG_JOB_LIMITS

KEY = "s3cret-key"
GOOD = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(launch: Callable[..., Any], small_checkpoint: Path) -> Any:
    return launch(small_checkpoint, api_key=KEY, request_timeout_s="2", **LONG_JOB_LIMITS)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_checks_need_no_key(server: Any, path: str) -> None:
    assert server.get(path).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/model"), ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/segment")],
)
@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing credentials; expected the header 'Authorization: Bearer <API key>'"),
        ({"Authorization": "Bearer wrong"}, "invalid API key"),
        (
            {"Authorization": f"Basic {KEY}"},
            "missing credentials; expected the header 'Authorization: Bearer <API key>'",
        ),
    ],
    ids=["none", "wrong", "not-bearer"],
)
def test_everything_else_needs_the_key(
    server: Any, method: str, path: str, headers: dict[str, str], detail: str
) -> None:
    send = server.post if method == "POST" else server.get
    r = send(path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json() == {"detail": detail}


def test_the_key_opens_every_route(server: Any, to_tiff: Callable[..., bytes]) -> None:
    assert server.get("/model", headers=GOOD).status_code == 200
    assert server.get("/openapi.json", headers=GOOD).status_code == 200
    r = server.post("/segment", content=to_tiff(np.zeros((40, 30), np.uint8)), headers=GOOD)
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
    metrics = server.get("/metrics", headers=GOOD).text
    assert 'unet_http_requests_total{code="401",method="GET",route="/model"}' in metrics


def test_a_request_over_its_time_limit_gets_504_and_stops(server: Any, long_job: bytes) -> None:
    r = server.post("/segment", params={"tile_size": 20}, content=long_job, headers=GOOD)
    assert r.status_code == 504
    assert r.json() == {"detail": "the segmentation did not finish within 2 s"}
    state = server.readyz()
    assert state["running"] == 0 and state["queued"] == 0  # the worker stopped; the slot is free
    assert server.get("/healthz").status_code == 200


def test_an_upload_that_stalls_gets_408(server: Any) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/tiff\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: 100000\r\n\r\n".encode()
            + b"II*\x00"  # ... and then nothing more
        )
        data = b""
        while b"}" not in data and (chunk := sock.recv(65536)):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408 ")
    assert b'{"detail":"the upload did not complete within 2 s"}' in data
    assert server.get("/healthz").status_code == 200
