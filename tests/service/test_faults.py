"""Faults of the machine, not of the input: a full disk, a kill -9, a SIGTERM, a slow client.

Each against real parts: a real 20 MB tmpfs (mounted here, or in a private user and mount
namespace where mounting is not permitted), real ``unet-tile serve`` processes killed with
real signals, clients on raw sockets. What is pinned is the error contract: a precise 4xx
(507 for a full disk, 503 + Retry-After at shutdown, 408 for a slow upload) with JSON
``{"detail": ...}``, or CLI exit 2 with one line; no traceback; nothing half-written left.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import numpy as np
import pytest
import tifffile

from tests.service.conftest import LONG_JOB_LIMITS, REPO, Server, start_server

TMPFS_SIZE = "20m"


@contextlib.contextmanager
def tmpfs(where: Path, *, size: str = TMPFS_SIZE, readonly: bool = False) -> Iterator[Path]:
    """A real tmpfs of ``size``; yields the path to use (``where`` itself, or the same mount seen
    through ``/proc/<pid>/root`` of a process holding it in a private mount namespace)."""
    where.mkdir(parents=True)
    options = f"size={size}" + (",ro" if readonly else "")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=False, capture_output=True
    )
    if mount.returncode == 0:
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], check=True)
        return
    if shutil.which("unshare"):
        holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             f"mount -t tmpfs -o {options} tmpfs '{where}' && echo ready && exec sleep 3600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert holder.stdout is not None
        ready = holder.stdout.readline().strip() == b"ready"
        try:
            if ready:
                yield Path(f"/proc/{holder.pid}/root") / where.relative_to("/")
                return
        finally:
            holder.kill()
            holder.wait()
    pytest.skip(
        "needs a real tmpfs: `mount -t tmpfs` is not permitted here (not root?) and "
        "`unshare --user --map-root-user --mount` is not available or not allowed"
    )


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def filled(root: Path, leave: int) -> Iterator[None]:
    """Fill the file system of ``root`` until ``leave`` bytes are free (one real, allocated file)."""
    filler = root / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, max(free_bytes(root) - leave, 1))
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


class RawPost:
    """``POST`` on a plain socket with a declared body sent piece by piece; stops sending once
    the server answers (as a real client does), then reads the whole answer."""

    def __init__(self, server: Server, path: str, length: int, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
        head += [f"{k}: {v}" for k, v in {"Content-Type": "image/tiff", **(headers or {})}.items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        self.sent = 0

    def send(self, pieces: Iterator[bytes]) -> None:
        for piece in pieces:
            if select.select([self.sock], [], [], 0)[0]:
                return  # answered early
            try:
                self.sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                return
            self.sent += len(piece)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                if len(body) >= int(headers.get("content-length", "0")):
                    return int(lines[0].split()[1]), headers, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before a complete answer: {data[:300]!r}")
            data += chunk

    def close(self) -> None:
        self.sock.close()


def pieces(total: int, size: int = 1 << 20, pause_s: float = 0.0) -> Iterator[bytes]:
    """``total`` bytes of a (truncated) TIFF, ``size`` at a time, ``pause_s`` apart."""
    first = True
    while total > 0:
        n = min(size, total)
        yield (b"II*\x00" + bytes(n - 4)) if first else bytes(n)
        first, total = False, total - n
        if pause_s:
            time.sleep(pause_s)


def noise(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def tiff_file(path: Path, data: np.ndarray, **kw: Any) -> Path:
    tifffile.imwrite(path, data, **kw)
    return path


def poll_job(
    server: Server, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 120
) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = server.get(f"/jobs/{job_id}").json()
        if until(job):
            return job
        if time.monotonic() > end:
            raise AssertionError(f"job never reached the condition; last {job}\n{server.log_text()}")
        time.sleep(0.05)


def assert_no_traceback(server: Server) -> None:
    log = server.log_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 20 MB tmpfs holding the jobs, spool and temp directories of :func:`full_server`."""
    with tmpfs(tmp_path_factory.mktemp("faults") / "tmpfs") as root:
        for name in ("jobs", "spool", "tmp"):
            (root / name).mkdir()
        yield root


@pytest.fixture(scope="module")
def full_server(disk: Path, small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose storage is the tmpfs; small upload time limits for the slow clients."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with mock.patch.dict(os.environ, {"TMPDIR": str(disk / "tmp")}):
        server = start_server(
            small_checkpoint,
            log,
            jobs_dir=str(disk / "jobs"),
            spool_dir=str(disk / "spool"),
            spool_mb="1",
            device="cpu",
            batch_size="1",
            jobs_upload_timeout_s="3",
            jobs_upload_idle_s="1",
        )
    yield server
    server.stop()


def job_dirs(disk: Path) -> list[str]:
    return sorted(p.name for p in (disk / "jobs").iterdir() if p.is_dir())


@pytest.mark.parametrize(
    ("route", "writing"),
    [("/segment", "spooling the upload to disk"), ("/jobs", "writing the upload to the jobs storage")],
)
def test_a_32_mb_upload_to_a_full_20_mb_disk_gets_507_and_leaves_nothing(
    full_server: Server, disk: Path, route: str, writing: str, to_tiff: Callable[..., bytes]
) -> None:
    before = files_under(disk)
    req = RawPost(full_server, route, 32 << 20)
    try:
        req.send(pieces(32 << 20))
        status, headers, body = req.answer()
    finally:
        req.close()
    assert status == 507, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"detail": f"no space left on device while {writing}"}  # and no path
    assert req.sent < 32 << 20  # answered as the disk filled, not after the whole body
    assert files_under(disk) == before  # no spool file, no job directory
    assert job_dirs(disk) == []
    small = to_tiff(noise((64, 64)))
    assert full_server.post("/segment", content=small).status_code == 200  # the server is fine
    assert_no_traceback(full_server)


@pytest.mark.parametrize(
    ("params", "room"),
    [
        ({"output": "probabilities"}, 256 << 10),  # in memory: write_tiff_atomic, ~2.5 MB of float32
        ({"pyramid": "true"}, 48 << 10),  # streamed: the tiled BigTIFF and its .level*.raw files
    ],
    ids=["in-memory", "streamed-pyramid"],
)
def test_a_job_whose_result_does_not_fit_fails_with_no_space_left_and_no_partial_file(
    full_server: Server, disk: Path, to_tiff: Callable[..., bytes], params: dict[str, str], room: int
) -> None:
    upload = to_tiff(noise((600, 600), seed=1))  # 360 KB in; the result needs more than is left
    with filled(disk, leave=len(upload) + room):
        before = files_under(disk)
        r = full_server.post("/jobs", content=upload, params={"tile_size": 388, **params})
        assert r.status_code == 202, r.text
        job = poll_job(full_server, r.json()["id"], lambda j: j["state"] not in ("queued", "running"))
        assert job["state"] == "failed"
        assert job["error"].startswith("no space left on device while writing the result")
        job_dir = disk / "jobs" / job["id"]
        assert sorted(p.name for p in job_dir.iterdir()) == ["job.json"]  # no upload, no partial result
        assert files_under(disk) == sorted([*before, f"jobs/{job['id']}/job.json"])
    assert httpx.delete(f"{full_server.url}/jobs/{job['id']}").status_code == 204
    assert_no_traceback(full_server)


def test_a_jobs_upload_that_stalls_or_crawls_gets_408_and_is_deleted(full_server: Server, disk: Path) -> None:
    stalled = RawPost(full_server, "/jobs", 100_000)
    crawling = RawPost(full_server, "/jobs", 10 << 20)
    try:
        stalled.send(pieces(4))  # "II*\0", then nothing (UNET_JOBS_UPLOAD_IDLE_S=1)
        t0 = time.monotonic()
        crawl = threading.Thread(target=crawling.send, args=(pieces(10 << 20, size=1024, pause_s=0.25),))
        crawl.start()  # 4 KB/s, never idle for 1 s; over UNET_JOBS_UPLOAD_TIMEOUT_S=3 in all
        status, _, body = stalled.answer()
        assert status == 408
        assert json.loads(body)["detail"] == "the upload stalled: no data for 1 s after 4 bytes"
        crawl.join(timeout=30)
        status, _, body = crawling.answer()
        took = time.monotonic() - t0
    finally:
        stalled.close()
        crawling.close()
    assert status == 408
    assert json.loads(body)["detail"] == "the upload did not complete within 3 s (UNET_JOBS_UPLOAD_TIMEOUT_S)"
    assert took < 20  # cut off, not left to send its 10 MB at 4 KB/s
    assert job_dirs(disk) == []  # both partial uploads deleted
    assert_no_traceback(full_server)


@pytest.fixture
def cli_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "out", size="4m") as root:
        yield root


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "service.cli", "segment", *map(str, args), "-q", "--precision", "fp32"]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [["--output", "probabilities"], ["--stream-above", "0"], ["--pyramid"]],
    ids=["in-memory", "streamed", "streamed-pyramid"],
)
def test_the_cli_on_a_full_disk_exits_2_with_one_line_and_leaves_nothing(
    tmp_path: Path, cli_disk: Path, small_checkpoint: Path, options: list[str]
) -> None:
    src = tiff_file(tmp_path / "in.tif", noise((600, 600), seed=2))
    with filled(cli_disk, leave=16 << 10):
        run = _cli(src, "-o", cli_disk / "mask.tif", "--checkpoint", small_checkpoint, *options)
        left = files_under(cli_disk)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [
        f"unet-tile: error: no space left on device while writing {cli_disk / 'mask.tif'}"
    ]
    assert left == ["filler"]  # no mask, no .part, no .level*.raw


@pytest.mark.slow
def test_the_cli_writing_to_a_read_only_directory_exits_2_with_one_line(tmp_path: Path, tiny_checkpoint: Path) -> None:
    src = tiff_file(tmp_path / "in.tif", noise((64, 64)))
    with tmpfs(tmp_path / "ro", size="1m", readonly=True) as ro:
        run = _cli(src, "-o", ro / "mask.tif", "--checkpoint", tiny_checkpoint)
        assert files_under(ro) == []
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == [f"unet-tile: error: read-only file system while writing {ro / 'mask.tif'}"]


# --- kill -9 and restart ---------------------------------------------------------------------


@pytest.mark.slow
def test_after_kill_9_mid_job_the_restart_cleans_up_and_the_rerun_gives_the_same_result(
    small_checkpoint: Path, tmp_path: Path, to_tiff: Callable[..., bytes]
) -> None:
    jobs = tmp_path / "jobs"
    settings = {"jobs_dir": str(jobs), "device": "cpu", "batch_size": "1"}
    upload = to_tiff(noise((800, 800), seed=3))
    params = {"pyramid": "true"}  # 9 tiles; while it runs, a .part result and a .level*.raw beside it
    first = start_server(small_checkpoint, tmp_path / "first.log", **settings)
    partial = RawPost(first, "/jobs", 10 << 20)  # an upload the kill cuts off mid-stream
    try:
        partial.send(pieces(1 << 20))
        job_id = first.post("/jobs", content=upload, params=params).json()["id"]
        end = time.monotonic() + 60
        while time.monotonic() < end:  # kill -9 while both kinds of temporary file are there
            names = [p.name for p in (jobs / job_id).iterdir()]
            if any(n.endswith(".raw") for n in names) and any(n.startswith(".result") for n in names):
                break
            time.sleep(0.01)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
    finally:
        partial.close()
        first.stop()
    assert json.loads((jobs / job_id / "job.json").read_text())["state"] == "running"  # killed mid-job
    upload_dirs = [d for d in jobs.iterdir() if d.is_dir() and not (d / "job.json").exists()]
    stale = sorted(p.name for p in (jobs / job_id).iterdir() if p.name.startswith("."))
    assert len(upload_dirs) == 1 and any(s.endswith(".part") for s in stale), (upload_dirs, stale)
    assert any(s.startswith(".level") and s.endswith(".raw") for s in stale), stale

    second = start_server(small_checkpoint, tmp_path / "second.log", **settings)
    try:
        assert not upload_dirs[0].exists()  # deleted at recovery, not an hour later
        assert not any((jobs / job_id / name).exists() for name in stale)
        rerun = poll_job(second, job_id, lambda j: j["state"] == "done")
        assert rerun["error"] is None
        assert sorted(p.name for p in (jobs / job_id).iterdir()) == ["job.json", "preview.bin", "result.tif"]
        again_id = second.post("/jobs", content=upload, params=params).json()["id"]
        poll_job(second, again_id, lambda j: j["state"] == "done")
        for level in (0, 1):  # the mask and its half-resolution level
            rerun_mask = tifffile.imread(jobs / job_id / "result.tif", level=level)
            uninterrupted = tifffile.imread(jobs / again_id / "result.tif", level=level)
            assert rerun_mask.shape == (800 // 2**level, 800 // 2**level)
            np.testing.assert_array_equal(rerun_mask, uninterrupted)
        assert "re-queued 1 job(s)" in second.log_text()
        assert "deleted 1 unfinished upload(s)" in second.log_text()
    finally:
        second.stop()


# --- SIGTERM ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_requests_cut_off_by_sigterm_get_json_503_with_retry_after_and_no_traceback(
    small_checkpoint: Path, tmp_path: Path, long_job: bytes
) -> None:
    server = start_server(
        small_checkpoint,
        tmp_path / "server.log",
        shutdown_timeout_s="1",
        **LONG_JOB_LIMITS,
        slots="1",
        queue_size="2",
        retry_after_s="7",
        device="cpu",
        jobs_dir=str(tmp_path / "jobs"),
    )
    answers: dict[str, tuple[int, dict[str, str], bytes] | BaseException] = {}
    requests: dict[str, RawPost] = {}
    try:
        for name in ("running", "queued"):
            requests[name] = RawPost(server, "/segment?tile_size=20", len(long_job))
            requests[name].send(iter([long_job]))
            queued = 1 if name == "queued" else 0
            server.wait_until(lambda s, q=queued: s["running"] == 1 and s["queued"] == q)
        requests["uploading"] = RawPost(server, "/segment", 1 << 20)  # a client still sending at shutdown
        requests["uploading"].send(pieces(4))

        def answer(name: str) -> None:
            try:
                answers[name] = requests[name].answer()
            except BaseException as e:  # reported by the assertions below
                answers[name] = e

        readers = [threading.Thread(target=answer, args=(n,)) for n in requests]
        for t in readers:
            t.start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=60)
        for t in readers:
            t.join(timeout=30)
    finally:
        for r in requests.values():
            r.close()
        server.stop()
    assert code == -signal.SIGTERM
    for name in ("running", "queued", "uploading"):
        got = answers[name]
        assert isinstance(got, tuple), (name, got)
        status, headers, body = got
        assert status == 503, (name, body)
        assert headers["content-type"] == "application/json" and headers["retry-after"] == "7", (name, headers)
        assert json.loads(body)["detail"].startswith("server shutting down"), (name, body)
    assert_no_traceback(server)
