"""``X-Request-ID`` on every response and ``UNET_LOG_FORMAT=json``, against a real server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Server = Any


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], tiny_checkpoint: Path) -> Server:
    return launch(tiny_checkpoint, log_format="json", device="cpu")


def test_the_clients_request_id_comes_back_and_is_on_its_log_lines(server: Server) -> None:
    r = server.get("/model", headers={"X-Request-ID": "trace-42.a:b"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a:b"
    bad = server.post("/segment", content=b"not a tiff", headers={"X-Request-ID": "trace-43"})
    assert bad.status_code == 415 and bad.headers["x-request-id"] == "trace-43"  # errors too
    new = server.get("/healthz", headers={"X-Request-ID": "spaces are not ids"})
    assert re.fullmatch(r"[0-9a-f]{32}", new.headers["x-request-id"])  # replaced by a fresh one
    assert re.fullmatch(r"[0-9a-f]{32}", server.get("/healthz").headers["x-request-id"])
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    assert lines, server.log_text()
    assert {"time", "level", "logger", "message", "request_id"} <= set(lines[0])
    mine = [line for line in lines if line["request_id"] == "trace-42.a:b"]
    assert any(line["logger"] == "uvicorn.access" and "/model" in line["message"] for line in mine), mine
    assert any(line["request_id"] is None and line["logger"].startswith("service") for line in lines)  # start-up
    text = [line for line in server.log_text().splitlines() if line.strip() and not line.startswith("{")]
    assert text == [], text  # every line is JSON
