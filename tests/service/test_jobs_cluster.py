"""``/jobs`` on a Dask cluster (``UNET_DASK_SCHEDULER``): the same API, one machine's result.

Real processes on 127.0.0.1: ``dask scheduler`` and two ``dask worker --nthreads 1`` (module
scoped), and ``unet-tile serve`` pointed at the scheduler. Jobs are uploaded, polled and
downloaded over HTTP and compared with :func:`service.pipeline.segment_file` on the same
image (fp32 on the CPU): the TIFF value for value, the zipped OME-Zarr store group by group,
chunk files included. A scheduler that cannot be reached fails the job saying where, and the
server connects again for the next job.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from distributed import Client

from service.errors import JobsOffError
from service.jobs import start_jobs
from service.settings import Settings
from tests.service.cluster_helpers import DaskProcesses, assert_same_store, make_image, reference, write_input

Server = Any  # tests/service/conftest.py's Server: url, get, post, stop, log_text

# 3074 rows: two blocks of rows (3072 + 2), and the second block runs the last row of tiles
# of the whole-image plan again (2 x 9 block tiles for 2 x 8 image tiles): progress must
# still end at the admitted tiles_total.
SHAPE = (3074, 700)
TILES = 8 * 2  # tiling.plan_tiles(SHAPE) at tile_size 388: what admission counts


def up(procs: DaskProcesses, workers: int) -> None:
    """Wait until ``workers`` workers joined ``procs``'s scheduler."""
    try:
        with Client(procs.address, timeout="60s", set_as_default=False) as c:
            c.wait_for_workers(workers, timeout=90)
    except Exception as e:
        raise RuntimeError(f"the dask processes did not come up: {e}\n{procs.log_text()}") from None


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskProcesses]:
    procs = DaskProcesses(tmp_path_factory.mktemp("dask"), workers=2)
    with procs.running():
        up(procs, 2)
        yield procs


@pytest.fixture(scope="module")
def jobs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def server(
    launch: Callable[..., Server], small_checkpoint: Path, dask_cluster: DaskProcesses, jobs_dir: Path
) -> Server:
    return launch(
        small_checkpoint, dask_scheduler=dask_cluster.address, jobs_dir=str(jobs_dir), device="cpu", precision="fp32"
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, small_checkpoint: Path) -> tuple[bytes, Path, Path]:
    """The upload, and one machine's TIFF and OME-Zarr results of it."""
    d = tmp_path_factory.mktemp("case")
    src = write_input(d / "img", make_image(SHAPE, "uint8", seed=4), "tif")
    tif, store = d / "ref.tif", d / "ref.ome.zarr"
    reference(small_checkpoint, src, tif)
    reference(small_checkpoint, src, store)
    return src.read_bytes(), tif, store


def tifffile_bytes(data: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, compression="zlib")
    return buf.getvalue()


def submit(server: Server, body: bytes, **params: Any) -> dict[str, Any]:
    r = server.post("/jobs", params=params, content=body, headers={"Content-Type": "image/tiff"})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    return job


def finished(server: Server, job_id: str, timeout: float = 90) -> dict[str, Any]:
    """The job's state once it ended; every answer on the way is a 200."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = server.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        state: dict[str, Any] = r.json()
        if state["state"] in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end; last {state}\n{server.log_text()}")


def only_the_record(jobs_dir: Path, job_id: str) -> None:
    """What a job that did not finish leaves: its record, no upload, result or partial file."""
    assert sorted(p.name for p in (jobs_dir / job_id).iterdir()) == ["job.json"]


@pytest.mark.slow
def test_tiff_job_on_the_cluster_equals_one_machine(server: Server, case: tuple[bytes, Path, Path]) -> None:
    body, ref, _ = case
    job = submit(server, body)
    assert job["progress"]["tiles_total"] == TILES
    assert job["streamed"] is True  # the cluster's route: labels always stream, decided at admission
    final = finished(server, job["id"])
    assert final["state"] == "done", final
    assert final["progress"] == {"tiles_done": TILES, "tiles_total": TILES, "fraction": 1.0}
    r = server.get(final["result_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
    got = tifffile.imread(io.BytesIO(r.content))
    want = tifffile.imread(ref)
    assert got.dtype == want.dtype == np.uint8 and set(np.unique(want)) == {0, 1}
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_ome_zarr_job_on_the_cluster_equals_one_machine(
    server: Server, case: tuple[bytes, Path, Path], tmp_path: Path
) -> None:
    body, _, ref = case
    job = submit(server, body, format="ome-zarr")
    final = finished(server, job["id"])
    assert final["state"] == "done", (final, server.log_text()[-3000:])
    assert final["progress"] == {"tiles_done": TILES, "tiles_total": TILES, "fraction": 1.0}
    r = server.get(final["result_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    store = tmp_path / "got.ome.zarr"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        z.extractall(store)
    assert_same_store(store, ref)


@pytest.mark.slow
def test_cancel_stops_the_blocks_on_the_cluster(server: Server, dask_cluster: DaskProcesses, jobs_dir: Path) -> None:
    body = tifffile_bytes(np.zeros((6200, 6200), np.uint8))  # 3 x 3 blocks, 289 tiles; a few KB compressed
    job = submit(server, body)
    end = time.monotonic() + 180  # a first block (64 tiles) is in; generous for a loaded 2-core machine
    while (state := server.get(f"/jobs/{job['id']}").json())["progress"]["tiles_done"] == 0:
        assert state["state"] in ("queued", "running"), (state, server.log_text()[-3000:])
        assert time.monotonic() < end, (state, dask_cluster.log_text()[-3000:], server.log_text()[-3000:])
        time.sleep(0.05)
    r = httpx.delete(f"{server.url}/jobs/{job['id']}", timeout=10)
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    final = finished(server, job["id"])
    assert final["state"] == "cancelled", final
    assert 0 < final["progress"]["tiles_done"] < final["progress"]["tiles_total"] == 17 * 17
    only_the_record(jobs_dir, job["id"])
    with Client(dask_cluster.address, timeout="10s", set_as_default=False) as c:  # its other blocks were cancelled
        end = time.monotonic() + 10
        while any(c.processing().values()):
            assert time.monotonic() < end, c.processing()
            time.sleep(0.1)


@pytest.mark.slow
def test_unreachable_scheduler_fails_the_job_and_the_next_job_connects_again(
    launch: Callable[..., Server],
    small_checkpoint: Path,
    case: tuple[bytes, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    body, ref, _ = case
    later = DaskProcesses(tmp_path_factory.mktemp("dask-later"), workers=1)  # its port: nothing listens yet
    jobs = tmp_path_factory.mktemp("jobs-unreachable")
    server = launch(small_checkpoint, dask_scheduler=later.address, jobs_dir=str(jobs), device="cpu")
    job = submit(server, body)
    final = finished(server, job["id"])
    assert final["state"] == "failed" and final["result_url"] is None, final
    assert f"cannot reach the Dask scheduler at {later.address}" in final["error"], final
    only_the_record(jobs, job["id"])
    assert server.get("/healthz").status_code == 200
    assert server.get("/readyz").status_code == 200
    assert server.get(f"/jobs/{job['id']}/result").status_code == 409
    with later.running():  # the scheduler comes up: the next job connects and runs
        up(later, 1)
        again = finished(server, submit(server, body)["id"])
        assert again["state"] == "done", again
        np.testing.assert_array_equal(
            tifffile.imread(io.BytesIO(server.get(again["result_url"]).content)), tifffile.imread(ref)
        )
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


def test_without_the_dask_extra_jobs_are_off_and_the_log_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "service.cluster", None)  # as if distributed were not installed
    settings = Settings(dask_scheduler="tcp://127.0.0.1:8786", jobs_dir=tmp_path / "jobs")
    with (
        caplog.at_level(logging.ERROR, logger="service.jobs"),
        pytest.raises(JobsOffError, match="UNET_DASK_SCHEDULER is set but the server lacks the dask extra"),
    ):
        start_jobs(settings, None)  # type: ignore[arg-type]  # never reaches the model
    assert "UNET_DASK_SCHEDULER is set but the dask extra is missing" in caplog.text
    assert not (tmp_path / "jobs").exists()  # refused before taking the jobs directory: queued jobs wait
