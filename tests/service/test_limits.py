"""The work limits over HTTP (on /segment and /jobs alike), the jobs' time limit, and /model's account of them.

The cases run against a real ``unet-tile serve`` on 127.0.0.1; the arithmetic that decides
them is tested in ``test_admission.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

import unet
from service.jobs import JobOptions, JobRecord, JobStore, JobWorker
from service.segmenter import Segmenter
from service.settings import Settings
from tests.service.conftest import Server, tiff_bytes

THIN = (1, 10_000_000)  # the image: a 10 KB zlib TIFF that tiles into 26,042 tiles


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], small_checkpoint: Path, jobs_dir: Path) -> Server:
    # default work limits; a job time limit no run can meet, so the one job that runs fails at its first batch
    return launch(small_checkpoint, jobs_dir=str(jobs_dir), jobs_timeout_s="0.001", batch_size="1", device="cpu")


@pytest.fixture(scope="module")
def thin_tiff() -> bytes:
    data = tiff_bytes(np.zeros(THIN, np.uint8), compression="zlib")
    assert len(data) < 20_000  # the "10 KB" upload
    return data


def job_dirs(root: Path) -> list[Path]:
    return [d for d in root.iterdir() if d.is_dir()]


def test_a_thin_zlib_tiff_gets_413_on_segment_and_jobs_and_leaves_nothing_behind(
    server: Server, thin_tiff: bytes, jobs_dir: Path
) -> None:
    before = job_dirs(jobs_dir)
    expected = (
        "at tile_size=388 the network would compute 2,800,452,512 input pixels (26,042 tiles of 188x572) for this "
        "1 x 10,000,000 image: 280 per image pixel; the limit is 64 (UNET_MAX_WORK_PER_PIXEL); no tile_size brings "
        "it within the limits, since most of every tile falls outside an image (or plane) this thin or small: "
        "send a 2-D region with more rows and columns"
    )
    for route in ("/segment", "/jobs"):
        r = server.post(route, content=thin_tiff, headers={"Content-Type": "image/tiff"})
        assert r.status_code == 413, (route, r.text)
        assert r.json() == {"detail": expected}
    assert job_dirs(jobs_dir) == before  # the upload went with the refusal
    assert server.get("/healthz").status_code == 200
    assert server.post("/segment", content=tiff_bytes(np.zeros((1, 300), np.uint8))).status_code == 200


def test_tile_size_4_on_a_256_square_image_gets_422_naming_the_limit_and_a_tile_size_that_fits(
    server: Server, jobs_dir: Path
) -> None:
    body = tiff_bytes(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8))
    before = job_dirs(jobs_dir)
    expected = (
        "at tile_size=4 the network would compute 144,769,024 input pixels (4,096 tiles of 188x188) for this "
        "256 x 256 image: 2,209 per image pixel; the limit is 64 (UNET_MAX_WORK_PER_PIXEL); use tile_size=388 (1 tile)"
    )
    for route in ("/segment", "/jobs"):
        r = server.post(route, params={"tile_size": 4}, content=body)
        assert r.status_code == 422, (route, r.text)
        assert r.json() == {"detail": expected}
    assert job_dirs(jobs_dir) == before
    ok = server.post("/segment", params={"tile_size": 388}, content=body)
    assert ok.status_code == 200 and ok.headers["x-tiles"] == "1"


def test_a_job_past_its_time_limit_fails_at_its_next_batch_and_frees_its_upload(server: Server, jobs_dir: Path) -> None:
    body = tiff_bytes(np.random.default_rng(1).integers(0, 255, (800, 800), dtype=np.uint8))  # 9 tiles
    r = server.post("/jobs", content=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    end = time.monotonic() + 60
    while (state := server.get(f"/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < end, state
        time.sleep(0.05)
    assert state["state"] == "failed"
    assert state["error"] == "the job did not finish within 0.001 s (UNET_JOBS_TIMEOUT_S)"
    assert 0 < state["progress"]["tiles_done"] < state["progress"]["tiles_total"] == 9
    assert [p.name for p in (jobs_dir / job_id).iterdir()] == ["job.json"]  # no upload, no result
    result = server.get(f"/jobs/{job_id}/result")
    assert result.status_code == 409 and "UNET_JOBS_TIMEOUT_S" in result.json()["detail"]


def test_jobs_timeout_0_means_no_time_limit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    unet.save_checkpoint(path, unet.UNet(unet.UNetConfig(depth=2, base_width=4)).eval())
    segmenter = Segmenter(unet.load_checkpoint(path), device="cpu", batch_size=1)
    store = JobStore(tmp_path / "jobs")
    worker = JobWorker(store, segmenter, timeout_s=Settings(jobs_timeout_s=0).jobs_timeout_s)
    worker.start()
    try:
        job_id = store.create_dir()
        tifffile.imwrite(store.input_path(job_id), np.zeros((100, 100), np.uint16))
        worker.submit(JobRecord(job_id, JobOptions(tile_size=20), tiles_total=25))
        end = time.monotonic() + 60
        while (record := store.load(job_id)).state in ("queued", "running"):
            assert time.monotonic() < end, record
            time.sleep(0.02)
    finally:
        worker.stop()
    assert record.state == "done" and record.error is None


def test_model_lists_the_work_limits(server: Server) -> None:
    limits: dict[str, Any] = server.get("/model").json()["limits"]
    assert limits["max_tiles"] == 4096 and limits["max_work_per_pixel"] == 64
