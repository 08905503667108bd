"""The job store and worker without HTTP: real files, a real (tiny) model, real threads."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import unet
from service.errors import InvalidJobIdError, JobError, JobNotFoundError, QuotaExceededError
from service.io import read_header
from service.jobs import JobOptions, JobRecord, JobStore, JobWorker
from service.pipeline import Options, choose_route, count_tiles, segment_image
from service.segmenter import Segmenter
from service.sources import read_image


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    torch.manual_seed(0)
    model = unet.UNet(unet.UNetConfig(depth=2, base_width=4)).eval()
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    unet.save_checkpoint(path, model)
    return Segmenter(unet.load_checkpoint(path), device="cpu", batch_size=1)


def image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def add_job(store: JobStore, worker: JobWorker, data: np.ndarray, **options: object) -> JobRecord:
    job_id = store.create_dir()
    tifffile.imwrite(store.input_path(job_id), data, tile=(64, 64))
    opts = JobOptions(**options)  # type: ignore[arg-type]
    header = read_header(store.input_path(job_id))
    route = choose_route(header, opts.pipeline, stream_above_mb=worker.stream_above_mb)
    record = JobRecord(
        job_id,
        opts,
        tiles_total=count_tiles(worker.segmenter, header, opts.pipeline),
        streamed=route.streamed,
        route=asdict(route),
    )
    worker.submit(record)
    return record


def wait_for(store: JobStore, job_id: str, done: Callable[[JobRecord], bool], timeout: float = 60) -> JobRecord:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        record = store.load(job_id)
        if done(record):
            return record
        time.sleep(0.02)
    raise AssertionError(f"job never reached the condition: {store.load(job_id)}")


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs", ttl_s=3600, quota_bytes=50 << 20)


@pytest.fixture
def worker(store: JobStore, segmenter: Segmenter) -> Iterator[JobWorker]:
    w = JobWorker(store, segmenter, stream_above_mb=0.05, housekeeping_s=0.2)
    w.start()
    yield w
    w.stop()


def test_ids_are_random_and_validated_before_any_path_use(store: JobStore) -> None:
    ids = {store.new_id() for _ in range(100)}
    assert len(ids) == 100
    for job_id in ids:
        assert store.validate_id(job_id) == job_id and len(job_id) == 32
    for bad in ["../" * 10 + "etc", "a" * 31, "a" * 33, "a" * 31 + "/", "a" * 31 + ".", "", "ä" * 32]:
        with pytest.raises(InvalidJobIdError):
            store.dir(bad)
    with pytest.raises(JobNotFoundError):
        store.load(store.new_id())


def test_record_is_written_atomically_and_round_trips(store: JobStore) -> None:
    job_id = store.create_dir()
    record = JobRecord(job_id, JobOptions(tile_size=100, pyramid=True), tiles_total=7, image={"shape": [5, 6]})
    store.save(record)
    assert sorted(p.name for p in store.dir(job_id).iterdir()) == ["job.json"]
    assert json.loads((store.dir(job_id) / "job.json").read_text())["options"]["pyramid"] is True
    assert store.load(job_id) == record


def test_worker_runs_jobs_in_memory_and_streamed_like_the_segmenter(
    store: JobStore, worker: JobWorker, segmenter: Segmenter
) -> None:
    small, big = image((90, 110)), image((240, 300), seed=1)  # 20 kB and 144 kB decoded; threshold 50 kB
    a = add_job(store, worker, small, tile_size=52)
    b = add_job(store, worker, big, tile_size=52)
    assert not a.streamed and b.streamed
    for job, data in ((a, small), (b, big)):
        record = wait_for(store, job.id, lambda r: r.state in ("done", "failed"))
        assert record.state == "done", record.error
        assert record.tiles_done == record.tiles_total > 1
        assert record.result_bytes == store.result_path(job.id).stat().st_size
        assert not store.input_path(job.id).exists()  # the upload is freed once the job ends
        tifffile.imwrite(store.root / "ref.tif", data)
        expected = segment_image(segmenter, read_image(store.root / "ref.tif"), Options(tile_size=52))[0]
        with tifffile.TiffFile(store.result_path(job.id)) as t:
            assert t.pages.first.is_tiled == job.streamed
            np.testing.assert_array_equal(t.asarray(), expected)


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_a_worker_sharing_the_servers_executor_runs_every_forward_pass_there(
    store: JobStore, segmenter: Segmenter, backend: str
) -> None:
    """What the app does: the job thread keeps the host work, the model runs on the segment thread."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    segmenter = Segmenter(segmenter.checkpoint, device="cpu", batch_size=1, backend=backend)
    passes: list[str] = []
    inner = segmenter.predictor
    run = inner.predict_labels  # every pass of a labels job, on whichever backend

    def counted(x: object) -> object:
        passes.append(threading.current_thread().name)
        return run(x)  # type: ignore[arg-type]

    inner.predict_labels = counted  # type: ignore[method-assign]
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment")
    shared = segmenter.running_on(executor)
    worker = JobWorker(store, shared, stream_above_mb=0.05, housekeeping_s=0.2)
    worker.start()
    try:
        small, big = image((90, 110)), image((240, 300), seed=1)
        jobs = [add_job(store, worker, small, tile_size=52), add_job(store, worker, big, tile_size=52)]
        records = [wait_for(store, job.id, lambda r: r.state in ("done", "failed")) for job in jobs]
    finally:
        worker.stop()
        executor.shutdown()
        del inner.predict_labels  # type: ignore[method-assign]
    assert [r.state for r in records] == ["done", "done"], [r.error for r in records]
    assert len(passes) == sum(r.tiles_total for r in records)  # batch size 1: one pass per tile
    assert set(passes) == {"segment_0"}
    for job, data in zip(jobs, (small, big), strict=True):
        tifffile.imwrite(store.root / "ref.tif", data)
        expected = segment_image(segmenter, read_image(store.root / "ref.tif"), Options(tile_size=52))[0]
        np.testing.assert_array_equal(tifffile.imread(store.result_path(job.id)), expected)
    assert shared.describe()["precision"] == segmenter.describe()["precision"]


def test_cancel_stops_a_running_job_and_a_queued_one(store: JobStore, worker: JobWorker) -> None:
    running = add_job(store, worker, image((600, 600)), tile_size=12)  # 2500 one-tile batches
    queued = add_job(store, worker, image((100, 100)), tile_size=12)
    wait_for(store, running.id, lambda r: r.tiles_done > 0)
    assert worker.cancel(queued.id).state == "cancelled"
    assert not store.input_path(queued.id).exists()
    assert worker.cancel(running.id).cancel_requested
    record = wait_for(store, running.id, lambda r: r.state == "cancelled")
    assert 0 < record.tiles_done < record.tiles_total
    time.sleep(0.3)
    assert store.load(running.id).tiles_done == record.tiles_done  # no more work after the cancel
    assert not store.result_path(running.id).exists()
    assert [p.name for p in store.dir(running.id).iterdir()] == ["job.json"]
    assert store.load(queued.id).state == "cancelled"


def test_stop_requeues_the_running_job_and_a_new_worker_finishes_it(
    store: JobStore, segmenter: Segmenter, worker: JobWorker
) -> None:
    job = add_job(store, worker, image((300, 300)), tile_size=12)
    wait_for(store, job.id, lambda r: r.tiles_done > 0)
    worker.stop()
    record = store.load(job.id)
    assert record.state == "queued" and record.tiles_done == 0
    again = JobWorker(store, segmenter)
    again.start()
    try:
        assert wait_for(store, job.id, lambda r: r.state == "done").attempts == 2
    finally:
        again.stop()


def test_a_shutdown_that_drops_a_jobs_forward_pass_queues_the_job_again(store: JobStore, segmenter: Segmenter) -> None:
    """The server stops jobs, waits (bounded), then shuts its executor down, dropping what is
    still queued there: a job whose next pass was dropped must be queued again, not failed."""
    submitted = threading.Event()

    class Executor(ThreadPoolExecutor):  # a real executor that says when work arrives
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            future = super().submit(fn, *args, **kwargs)
            submitted.set()
            return future

    executor = Executor(max_workers=1, thread_name_prefix="segment")
    busy = threading.Event()
    executor.submit(busy.wait)  # a long /segment request holds the model's thread
    submitted.clear()
    worker = JobWorker(store, segmenter.running_on(executor))
    worker.start()
    job = add_job(store, worker, image((200, 200)))
    assert submitted.wait(30)  # the job's first forward pass waits behind the request
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 30})
    stopper.start()
    while not worker._stopping.is_set():  # stop() has begun
        time.sleep(0.01)
    executor.shutdown(wait=False, cancel_futures=True)  # what the app does once stop() gives up
    busy.set()
    stopper.join()
    record = store.load(job.id)
    assert (record.state, record.tiles_done, record.error) == ("queued", 0, None)
    assert store.input_path(job.id).exists()  # kept for the rerun


def test_recover_requeues_jobs_left_running_by_a_crash(store: JobStore) -> None:
    job_id = store.create_dir()
    store.input_path(job_id).write_bytes(b"the upload")
    store.save(JobRecord(job_id, JobOptions(), state="running", started=1.0, tiles_done=3, tiles_total=9))
    assert store.recover() == [job_id]
    record = store.load(job_id)
    assert (record.state, record.tiles_done, record.started) == ("queued", 0, None)


def test_recover_fails_a_running_job_whose_upload_was_already_freed(store: JobStore) -> None:
    # a crash between freeing the upload and recording the end leaves nothing to run again
    job_id = store.create_dir()
    store.save(JobRecord(job_id, JobOptions(), state="running", started=1.0, tiles_done=9, tiles_total=9))
    assert store.recover() == []
    record = store.load(job_id)
    assert record.state == "failed" and record.finished is not None
    assert "submit the image again" in (record.error or "")


def test_finished_jobs_expire(tmp_path: Path) -> None:
    store = JobStore(tmp_path, ttl_s=60)
    job_id = store.create_dir()
    store.save(JobRecord(job_id, JobOptions(), state="done", finished=time.time()))
    (store.dir(job_id) / "result.tif").write_bytes(b"x")
    assert store.load(job_id).state == "done"
    assert store.expire() == 0
    store.update(job_id, lambda r: setattr(r, "finished", time.time() - 61))  # ended 61 s ago: past its ttl
    assert store.expire() == 1
    assert not store.dir(job_id).exists()
    with pytest.raises(JobNotFoundError):
        store.load(job_id)


def test_quota_counts_everything_stored(tmp_path: Path) -> None:
    store = JobStore(tmp_path, quota_bytes=1000)
    job_id = store.create_dir()
    store.input_path(job_id).write_bytes(b"x" * 600)
    store.check_quota(400)
    with pytest.raises(QuotaExceededError, match="exceeds the quota"):
        store.check_quota(401)


def test_concurrent_updates_do_not_lose_a_cancel_request(store: JobStore) -> None:
    job_id = store.create_dir()
    store.save(JobRecord(job_id, JobOptions(), state="running", tiles_total=1000))

    def progress() -> None:
        for i in range(200):
            store.update(job_id, lambda r, i=i: setattr(r, "tiles_done", i))  # type: ignore[misc]

    t = threading.Thread(target=progress)
    t.start()
    store.update(job_id, lambda r: setattr(r, "cancel_requested", True))
    t.join()
    assert store.load(job_id).cancel_requested


def test_one_worker_process_per_jobs_directory(store: JobStore, segmenter: Segmenter, worker: JobWorker) -> None:
    with pytest.raises(JobError, match="in use by another server"):
        JobWorker(store, segmenter).start()
