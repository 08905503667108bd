"""Real servers for the HTTP tests: ``unet-tile serve`` in a subprocess on 127.0.0.1.

Each test module starts the few servers it needs (module scope, one per distinct set of
settings), each on a random free port with its settings in ``UNET_*`` variables, waits
for ``/readyz`` and terminates it (SIGTERM) at the end.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile

import unet
from tests.conftest import balance_classes

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def readyz(self) -> dict[str, Any]:
        r = self.get("/readyz", timeout=10)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        """Poll /readyz (running, queued) until ``predicate`` holds."""
        end = time.monotonic() + timeout
        while True:
            state = self.readyz()
            if predicate(state):
                return state
            if time.monotonic() > end:
                raise AssertionError(f"server state never reached the condition; last {state}\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def spawn(
    checkpoint: Path, log: Path, args: tuple[str, ...] = (), **settings: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``unet-tile serve`` with ``UNET_*`` settings; returns the process and its port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNET_")}
    env.update({"UNET_CHECKPOINT": str(checkpoint), "UNET_HOST": "127.0.0.1", "UNET_PORT": str(port)})
    env["UNET_PRECISION"] = "fp32"  # exact masks to compare with; a test may ask for "auto" (the default)
    # a jobs directory of its own: the default one may be held by another server (make serve)
    env["UNET_JOBS_DIR"] = str(log.parent / "jobs")
    env.update({f"UNET_{k.upper()}": v for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, port


def start_server(checkpoint: Path, log: Path, **settings: str) -> Server:
    proc, port = spawn(checkpoint, log, **settings)
    server = Server(f"http://127.0.0.1:{port}", port, proc, log, settings)
    end = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log_text()}")


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``launch(checkpoint, **settings)`` starts a server that lives until the module ends."""
    servers: list[Server] = []

    def _launch(checkpoint: Path, **settings: str) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = start_server(checkpoint, log, **settings)
        servers.append(server)
        return server

    yield _launch
    for server in servers:
        server.stop()


def tiff_bytes(data: np.ndarray[Any, Any], **kw: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def to_tiff() -> Callable[..., bytes]:
    """``to_tiff(array, **tifffile_kwargs)``: the array as TIFF bytes."""
    return tiff_bytes


# What a server needs to accept ``long_job`` at tile_size=20: 15625 tiles (UNET_MAX_TILES is 4096)
# computing 163 network-input pixels per image pixel (UNET_MAX_WORK_PER_PIXEL is 64).
LONG_JOB_LIMITS = {"max_tiles": "20000", "max_work_per_pixel": "200"}


@pytest.fixture(scope="session")
def long_job() -> bytes:
    """A 2000x2000 image that compresses to a few KB; at tile_size=20 it is 15625 tiles (minutes).

    The default work limits refuse that (422); servers that run it are launched with
    ``**LONG_JOB_LIMITS``.
    """
    return tiff_bytes(np.zeros((2000, 2000), np.uint8), compression="zlib")


class RawRequest:
    """An HTTP request on a plain socket, so a test can walk away from it (close) at will."""

    def __init__(self, server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    def response(self) -> tuple[int, bytes]:
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    None,
                )
                if length is not None and len(rest) >= length:
                    break
        return int(data.split(b" ")[1]), data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_request() -> Iterator[Callable[..., RawRequest]]:
    """``raw_request(server, path, body, headers)``: a request on a socket the test can close."""
    opened: list[RawRequest] = []

    def _open(server: Server, path: str, body: bytes, headers: dict[str, str] | None = None) -> RawRequest:
        req = RawRequest(server, path, body, headers)
        opened.append(req)
        return req

    yield _open
    for req in opened:
        req.close()


def balanced_model(base_width: int = 4, seed: int = 3) -> unet.UNet:
    """A random U-Net whose head bias is set so both classes occur on noise images."""
    import torch

    torch.manual_seed(seed)
    model = unet.UNet(unet.UNetConfig(base_width=base_width)).eval()
    return balance_classes(model, torch.rand(1, 1, 572, 572))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random base-width-4 checkpoint (2 classes, both predicted) for the servers."""
    path = tmp_path_factory.mktemp("svc-ckpt") / "w4.safetensors"
    unet.save_checkpoint(path, balanced_model(), class_names=["background", "nucleus"])
    return path
