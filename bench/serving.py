"""One way to run ``unet-tile serve`` for a bench: started, waited for, always stopped."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from http.client import HTTPConnection
from pathlib import Path

__all__ = ["running_server"]

READY_TIMEOUT_S = 180.0


def _ready(port: int) -> bool:
    conn = HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/readyz", headers={"connection": "close"})
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def running_server(
    cmd: Sequence[str], port: int, log_path: Path, *, env: dict[str, str], cwd: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``cmd`` (a server on 127.0.0.1:``port``), its output in ``log_path``; yield
    (url, process) once ``/readyz`` answers 200; terminate it (then kill) on the way out."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(port):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {READY_TIMEOUT_S:g} s")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
