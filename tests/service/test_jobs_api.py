"""``/jobs`` end to end against real ``unet-tile serve`` processes on 127.0.0.1."""

from __future__ import annotations

import io
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
import torch

import unet

Server = Any  # tests/service/conftest.py's Server: url, get, post, stop, log_text

JOB_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    unet.save_checkpoint(path, unet.UNet(unet.UNetConfig(depth=2, base_width=4)).eval())
    return path


def tiff(data: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, **kw)
    return buf.getvalue()


def image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def submit(server: Server, body: bytes, **params: Any) -> dict[str, Any]:
    r = server.post("/jobs", params=params, content=body, headers={"Content-Type": "image/tiff"})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    assert JOB_ID.fullmatch(job["id"]) and r.headers["location"] == job["url"] == f"/jobs/{job['id']}"
    return job


def poll(
    server: Server, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> list[dict[str, Any]]:
    """Every state seen until ``until`` holds (the last one satisfies it)."""
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        r = server.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if until(seen[-1]):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"job never reached the condition; last {seen[-1]}\n{server.log_text()}")


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], checkpoint: Path, jobs_dir: Path) -> Server:
    return launch(checkpoint, jobs_dir=str(jobs_dir), batch_size="1", device="cpu", stream_above_mb="0.05")


def test_submit_poll_download_matches_segment(server: Server) -> None:
    data = image((240, 300))  # 144 kB decoded: streamed (UNET_STREAM_ABOVE_MB=0.05)
    job = submit(server, tiff(data, tile=(64, 64)), tile_size=52)
    assert job["state"] == "queued" and job["streamed"] is True
    assert job["progress"]["tiles_total"] == 6 * 5
    states = poll(server, job["id"], lambda s: s["state"] in ("done", "failed"))
    final = states[-1]
    assert final["state"] == "done", final
    assert final["progress"] == {"tiles_done": 30, "tiles_total": 30, "fraction": 1.0}
    assert final["eta_s"] == 0.0 and final["elapsed_s"] > 0 and final["result_url"] == f"/jobs/{job['id']}/result"
    r = server.get(final["result_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
    with tifffile.TiffFile(io.BytesIO(r.content)) as t:
        assert t.pages.first.is_tiled
        mask = t.asarray()
    direct = server.post("/segment", params={"tile_size": 52}, content=tiff(data))  # the in-memory path
    assert direct.status_code == 200, direct.text
    np.testing.assert_array_equal(mask, tifffile.imread(io.BytesIO(direct.content)))


def test_multipart_upload_and_probabilities(server: Server) -> None:
    data = image((60, 70), seed=1)
    r = server.post(
        "/jobs",
        params={"output": "probabilities", "tile_size": 52},
        files={"file": ("x.tif", tiff(data), "image/tiff")},
    )
    assert r.status_code == 202, r.text
    final = poll(server, r.json()["id"], lambda s: s["state"] in ("done", "failed"))[-1]
    assert final["state"] == "done" and final["streamed"] is False
    probs = tifffile.imread(io.BytesIO(server.get(final["result_url"]).content))
    assert probs.shape == (2, 60, 70) and probs.dtype == np.float32


def test_progress_advances_and_cancel_stops_the_work(server: Server) -> None:
    job = submit(server, tiff(image((600, 600), seed=2)), tile_size=12)  # 2500 one-tile batches
    running = poll(server, job["id"], lambda s: s["progress"]["tiles_done"] > 0)[-1]
    later = poll(server, job["id"], lambda s: s["progress"]["tiles_done"] > running["progress"]["tiles_done"])[-1]
    assert later["state"] == "running" and later["eta_s"] is not None and later["eta_s"] > 0
    assert server.get(f"/jobs/{job['id']}/result").status_code == 409  # not done yet
    r = httpx.delete(f"{server.url}/jobs/{job['id']}", timeout=10)
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    cancelled = poll(server, job["id"], lambda s: s["state"] == "cancelled")[-1]
    stopped_at = cancelled["progress"]["tiles_done"]
    assert 0 < stopped_at < cancelled["progress"]["tiles_total"]
    time.sleep(0.6)  # longer than the progress save interval: nothing more is done
    assert server.get(f"/jobs/{job['id']}").json()["progress"]["tiles_done"] == stopped_at
    r = server.get(f"/jobs/{job['id']}/result")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert httpx.delete(f"{server.url}/jobs/{job['id']}", timeout=10).status_code == 204  # now deleted
    assert server.get(f"/jobs/{job['id']}").status_code == 404


def test_unknown_and_malformed_ids(server: Server) -> None:
    unknown = "A" * 32
    for method, path in (("GET", ""), ("GET", "/result"), ("DELETE", "")):
        r = httpx.request(method, f"{server.url}/jobs/{unknown}{path}", timeout=10)
        assert r.status_code == 404 and "no such job" in r.json()["detail"]
        for bad in ("short", "A" * 33, "A" * 31 + "."):
            r = httpx.request(method, f"{server.url}/jobs/{bad}{path}", timeout=10)
            assert r.status_code == 422, (bad, r.text)
            assert "job_id" in r.json()["detail"]


def test_bad_uploads_leave_nothing_behind(server: Server, jobs_dir: Path) -> None:
    before = sorted(p.name for p in jobs_dir.iterdir())
    r = server.post("/jobs", content=b"not a tiff at all")
    assert r.status_code == 415
    r = server.post("/jobs", params={"tile_size": 50}, content=tiff(image((40, 40))))
    assert r.status_code == 422 and "tile_size" in r.json()["detail"]
    r = server.post("/jobs", params={"pyramid": "true", "output": "probabilities"}, content=tiff(image((40, 40))))
    assert r.status_code == 422 and "pyramid" in r.json()["detail"]  # options that do not go together
    stack = tiff(np.stack([image((40, 40)), image((40, 40))]), metadata={"axes": "ZYX"}, photometric="minisblack")
    r = server.post("/jobs", params={"pyramid": "true"}, content=stack)
    assert r.status_code == 422 and "single 2-D image" in r.json()["detail"]
    assert sorted(p.name for p in jobs_dir.iterdir()) == before


def test_results_survive_a_restart(
    server: Server, launch: Callable[..., Server], checkpoint: Path, jobs_dir: Path
) -> None:
    data = image((100, 120), seed=3)
    job = submit(server, tiff(data), tile_size=52, pyramid="true")
    poll(server, job["id"], lambda s: s["state"] == "done")
    before = server.get(f"/jobs/{job['id']}/result").content
    assert server.stop() == -signal.SIGTERM  # uvicorn re-raises the signal after its clean shutdown
    assert "shut down" in server.log_text()
    again = launch(checkpoint, jobs_dir=str(jobs_dir), device="cpu")
    state = again.get(f"/jobs/{job['id']}").json()
    assert state["state"] == "done" and state["options"]["pyramid"] is True
    r = again.get(f"/jobs/{job['id']}/result")
    assert r.status_code == 200 and r.content == before
    assert 'filename="mask.ome.tif"' in r.headers["content-disposition"]


def test_results_expire_and_quota_is_enforced(launch: Callable[..., Server], checkpoint: Path, tmp_path: Path) -> None:
    server = launch(checkpoint, jobs_dir=str(tmp_path), jobs_ttl_s="3", jobs_quota_mb="0.1", device="cpu")
    job = submit(server, tiff(image((40, 50))), tile_size=52)
    done = poll(server, job["id"], lambda s: s["state"] == "done")[-1]
    assert server.get(f"/jobs/{job['id']}/result").status_code == 200  # within its 3 s
    big = tiff(image((300, 300), seed=4))  # 180 kB > 0.1 MiB
    r = server.post("/jobs", content=big)
    assert r.status_code == 507 and "UNET_JOBS_QUOTA_MB" in r.json()["detail"]
    r = server.post("/jobs", content=iter([big[:50_000], big[50_000:]]))  # chunked: no Content-Length to check first
    assert r.status_code == 507, r.text
    time.sleep(max(0.0, done["expires"] - time.time()) + 0.2)  # past its expiry, by the server's clock
    assert server.get(f"/jobs/{job['id']}").status_code == 404
    assert server.get(f"/jobs/{job['id']}/result").status_code == 404
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


@pytest.mark.parametrize("why", ["UNET_JOBS_WORKERS=0", "a jobs directory another server holds"])
def test_jobs_off_by_the_settings_say_so_without_retry_after(
    launch: Callable[..., Server], checkpoint: Path, to_tiff: Callable[..., bytes], tmp_path: Path, why: str
) -> None:
    """/jobs off by the settings answers 503 saying why, with no Retry-After (a retry will not
    help until the settings change); /segment serves as ever."""
    if why == "UNET_JOBS_WORKERS=0":
        server, detail = launch(checkpoint, jobs_workers="0"), "UNET_JOBS_WORKERS=0"
    else:
        launch(checkpoint, jobs_dir=str(tmp_path), device="cpu")  # takes the directory first
        server = launch(checkpoint, jobs_dir=str(tmp_path), device="cpu")
        detail = "jobs directory <path> is in use by another server process"
    body = to_tiff(np.zeros((64, 64), np.uint8))
    answers = [
        server.post("/jobs", content=body, headers={"Content-Type": "image/tiff"}),
        server.get("/jobs/" + "a" * 32),
    ]
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json() == {"detail": f"/jobs is off on this server: {detail}"}
        assert "retry-after" not in r.headers
    assert server.post("/segment", content=body, headers={"Content-Type": "image/tiff"}).status_code == 200
    assert server.get("/readyz").status_code == 200
