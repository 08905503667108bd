"""The work one request may ask for (tiles, network-input pixels per image pixel) and the jobs' time limit.

The HTTP cases run against a real ``unet-tile serve`` on 127.0.0.1; the arithmetic that
decides them is held to :func:`tiling.plan_tiles` directly.
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
from service.errors import ImageTooLargeError
from service.io import ImageHeader
from service.jobs import JobOptions, JobRecord, JobStore, JobWorker
from service.limits import check_work, plan_work
from service.segmenter import Segmenter
from service.settings import Settings
from tests.service.conftest import Server, tiff_bytes
from tiling import plan_tiles
from unet import GeometryError

THIN = (1, 10_000_000)  # the image: a 10 KB zlib TIFF that tiles into 26,042 tiles


def header(shape: tuple[int, ...], axes: str = "YX") -> ImageHeader:
    return ImageHeader(shape, axes, np.dtype("uint8"), None, None, None)


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


def test_plan_work_counts_the_tiles_that_plan_tiles_lays_out() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        depth = int(rng.integers(2, 5))
        shape = (int(rng.integers(1, 900)), int(rng.integers(1, 900)))
        if rng.random() < 0.2:  # strips and specks
            shape = (int(rng.integers(1, 20)), int(rng.integers(1, 5000)))
        sizes = unet.geometry.valid_input_sizes(depth, stop=1600)
        tile = sizes[int(rng.integers(len(sizes)))] - 2 * unet.geometry.context_margin(depth)
        plan = plan_tiles(shape, depth=depth, tile_size=tile)
        work = plan_work(*shape, 3, tile, depth)
        assert work.tiles == 3 * len(plan), (shape, tile, depth)
        assert work.tile_in == plan.tile_in
        assert work.computed == 3 * len(plan) * plan.tile_in[0] * plan.tile_in[1]


@pytest.mark.parametrize(
    ("shape", "axes", "jobs"),
    [
        ((16384, 16384), "YX", False),  # UNET_MAX_PIXELS on /segment
        ((131072, 131072), "YX", True),  # UNET_JOBS_MAX_PIXELS = 2**34, square
        ((16384, 2**20), "YX", True),  # 2**34, wide
        ((256, 2**26), "YX", True),  # 2**34, a strip one tile high
        ((1, 1), "YX", False),
        ((1000, 64, 64), "QYX", False),  # a stack of small planes
    ],
)
def test_the_default_limits_admit_the_largest_normal_requests_at_tile_size_388(
    shape: tuple[int, ...], axes: str, jobs: bool
) -> None:
    work = check_work(header(shape, axes), 4, Settings(), tile_size=388, jobs=jobs)
    assert work.tiles == plan_work(shape[-2], shape[-1], shape[0] if len(shape) == 3 else 1, 388, 4).tiles


def test_a_small_image_passes_at_any_tile_size() -> None:
    """Below 1 MiPx an image counts as 1 MiPx: a tiny request is cheap however it is tiled."""
    settings = Settings()
    for tile in (4, 20, 36):
        work = check_work(header((40, 60)), 4, settings, tile_size=tile)  # admitted: no error
        assert work.tiles == plan_work(40, 60, 1, tile, 4).tiles
    assert work.per_pixel > settings.max_work_per_pixel  # over the ratio by its own pixels: the floor let it in


def test_too_many_tiles_at_a_small_tile_size_gets_422_naming_a_tile_size_and_jobs() -> None:
    with pytest.raises(GeometryError) as e:
        check_work(header((16384, 16384)), 4, Settings(), tile_size=36)
    assert str(e.value) == (
        "at tile_size=36 this 16,384 x 16,384 image needs 262,144 tiles; this server runs at most 4,096 per request "
        "(UNET_MAX_TILES); use tile_size=388 (1,849 tiles), or submit it to POST /jobs (up to 262,144 tiles, "
        "UNET_JOBS_MAX_TILES)"
    )


def test_too_many_tiles_at_every_tile_size_gets_413_pointing_to_jobs() -> None:
    settings = Settings(max_tiles=100)
    with pytest.raises(ImageTooLargeError) as e:
        check_work(header((16384, 16384)), 4, settings, tile_size=388)
    assert str(e.value) == (
        "at tile_size=388 this 16,384 x 16,384 image needs 1,849 tiles; this server runs at most 100 per request "
        "(UNET_MAX_TILES); no tile_size brings it within the limits: send a smaller image, or submit it to "
        "POST /jobs (up to 262,144 tiles, UNET_JOBS_MAX_TILES)"
    )
    with pytest.raises(ImageTooLargeError, match=r"at most 100 per job \(UNET_JOBS_MAX_TILES\).*smaller image$"):
        check_work(header((16384, 16384)), 4, Settings(jobs_max_tiles=100), tile_size=388, jobs=True)


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
