"""Jobs for long runs: an on-disk job store and the worker threads that run it.

A job is a directory ``<jobs dir>/<id>/`` holding ``job.json`` (its state, rewritten
atomically on every change), ``input.tif`` (the upload, deleted once the job ends) and
the result: ``result.tif`` (the mask), or with ``format=ome-zarr`` ``result.ome.zarr.zip``
(the OME-Zarr store ``result.ome.zarr`` written by the pipeline, zipped once complete). Nothing lives only in memory, so queued jobs and finished
results survive a restart; a job that was running when the process stopped is queued
again. Results expire ``ttl_s`` after their job ended, and the whole directory is held
under a byte quota.

Writers put temporary files beside their target (``.job.json.*.part``, ``.result.tif.*.part``,
the pyramid's ``.level*.raw``) and delete them when they fail; a process killed mid-write
cannot, so :meth:`JobStore.recover` deletes them at the next start, with the directories of
uploads that never became a job. A result that does not fit on the disk fails its job
with "no space left on device while writing the result" and leaves no partial file.

Job ids are ``secrets.token_urlsafe(24)`` (192 random bits, 32 characters of
``[A-Za-z0-9_-]``) and are checked against :data:`JOB_ID_PATTERN` before they touch a path.

States::

    queued ──> running ──> done
       │          ├──────> failed
       └──────────┴──────> cancelled

Errors: :class:`service.errors.JobError` and its subclasses (malformed id, not found, not
ready, quota), mapped to HTTP by :mod:`service.http_errors`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from unet.atomic import atomic_path

from .errors import (
    InvalidJobIdError,
    JobError,
    JobNotFoundError,
    QuotaExceededError,
    is_storage_full,
    storage_error,
)
from .pipeline import DEFAULT_STREAM_ABOVE_MB, Options, Route, segment_file
from .segmenter import Segmenter
from .settings import Settings

__all__ = [
    "JOB_ID_PATTERN",
    "JobOptions",
    "JobRecord",
    "JobStore",
    "JobWorker",
    "State",
    "jobs_dir",
    "start_jobs",
]

log = logging.getLogger(__name__)

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{32}$"
_ID = re.compile(JOB_ID_PATTERN)
State = Literal["queued", "running", "done", "failed", "cancelled"]
FINAL_STATES = ("done", "failed", "cancelled")
_SAVE_EVERY_S = 0.5  # progress is written to disk at most this often


@dataclass(frozen=True)
class JobOptions:
    """What to compute; the same options as ``POST /segment``, and the result's format."""

    output: Literal["labels", "probabilities"] = "labels"
    tile_size: int = 388
    pyramid: bool = False
    series: int = 0  # which image series of the file
    format: Literal["tiff", "ome-zarr"] = "tiff"  # ome-zarr: an OME-Zarr store, downloaded as a zip

    @property
    def pipeline(self) -> Options:
        return Options(output=self.output, tile_size=self.tile_size, pyramid=self.pyramid, series=self.series)


@dataclass
class JobRecord:
    """Everything about one job, as stored in its ``job.json``."""

    id: str
    options: JobOptions
    state: State = "queued"
    created: float = field(default_factory=time.time)  # Unix times
    started: float | None = None
    finished: float | None = None
    tiles_done: int = 0
    tiles_total: int = 0
    image: dict[str, Any] = field(default_factory=dict)  # shape, axes, dtype
    streamed: bool = False
    route: dict[str, str] = field(default_factory=dict)  # how it is read and written (pipeline.Route)
    cancel_requested: bool = False
    error: str | None = None
    input_bytes: int = 0
    result_bytes: int = 0
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        data = dict(data)
        data["options"] = JobOptions(**data["options"])
        return cls(**data)

    def expires(self, ttl_s: float) -> float | None:
        return None if self.finished is None else self.finished + ttl_s

    def public(self, ttl_s: float, now: float | None = None) -> dict[str, Any]:
        """The state as the API shows it: progress, elapsed time and an ETA.

        >>> r = JobRecord("x" * 32, JobOptions(), state="running", started=100.0, tiles_done=5, tiles_total=20)
        >>> p = r.public(60, now=110.0)
        >>> p["progress"], p["elapsed_s"], p["eta_s"]
        ({'tiles_done': 5, 'tiles_total': 20, 'fraction': 0.25}, 10.0, 30.0)
        """
        now = time.time() if now is None else now
        end = self.finished if self.finished is not None else now
        elapsed = None if self.started is None else round(end - self.started, 3)
        eta = None
        if self.state == "running" and elapsed is not None and self.tiles_done > 0:
            eta = round(elapsed * (self.tiles_total - self.tiles_done) / self.tiles_done, 3)
        elif self.state == "done":
            eta = 0.0
        fraction = self.tiles_done / self.tiles_total if self.tiles_total else 0.0
        return {
            "id": self.id,
            "url": f"/jobs/{self.id}",
            "state": self.state,
            "options": asdict(self.options),
            "image": self.image,
            "streamed": self.streamed,
            "progress": {
                "tiles_done": self.tiles_done,
                "tiles_total": self.tiles_total,
                "fraction": round(fraction, 4),
            },
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "elapsed_s": elapsed,
            "eta_s": eta,
            "cancel_requested": self.cancel_requested,
            "error": self.error,
            "result_url": f"/jobs/{self.id}/result" if self.state == "done" else None,
            "result_bytes": self.result_bytes if self.state == "done" else None,
            "expires": self.expires(ttl_s),
        }


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if it is still there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _zip_store(store: Path, target: Path) -> None:
    """A zarr directory store as a zip at ``target`` (atomically): entries stored, not
    recompressed (the chunks are), paths relative to the store's root (zarr's ZipStore reads it)."""
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for path in sorted(store.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(store).as_posix())


class JobStore:
    """Jobs on disk under ``root``: one directory per job, state in ``job.json``.

    Every change goes through :meth:`update` (read, modify, write atomically, under one
    lock), so progress written by a worker never overwrites a cancel request.
    """

    STATE, INPUT = "job.json", "input.tif"
    RESULTS: ClassVar[dict[str, str]] = {"tiff": "result.tif", "ome-zarr": "result.ome.zarr.zip"}
    STORE = "result.ome.zarr"  # an OME-Zarr result before it is zipped
    PARTIALS = (".*.part", ".level*.raw")  # what the atomic writers leave if the process dies mid-write

    def __init__(self, root: str | os.PathLike[str], *, ttl_s: float = 86400.0, quota_bytes: int = 20 << 30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self.quota_bytes = quota_bytes
        self._lock = threading.RLock()

    # ids and paths
    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(24)

    @staticmethod
    def validate_id(job_id: str) -> str:
        """``job_id`` if it has the form of an id this store hands out, else :class:`InvalidJobIdError`.

        >>> JobStore.validate_id("../../etc/passwd")
        Traceback (most recent call last):
        ...
        service.errors.InvalidJobIdError: malformed job id; expected 32 characters of A-Z, a-z, 0-9, '_' or '-'
        """
        if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
            raise InvalidJobIdError("malformed job id; expected 32 characters of A-Z, a-z, 0-9, '_' or '-'")
        return job_id

    def dir(self, job_id: str) -> Path:
        return self.root / self.validate_id(job_id)

    def input_path(self, job_id: str) -> Path:
        return self.dir(job_id) / self.INPUT

    def result_path(self, job_id: str, format: str = "tiff") -> Path:
        return self.dir(job_id) / self.RESULTS[format]

    # records
    def create_dir(self) -> str:
        """A fresh id with its (empty) directory; the upload goes there before the record."""
        while True:
            job_id = self.new_id()
            with contextlib.suppress(FileExistsError):
                self.dir(job_id).mkdir()
                return job_id

    def save(self, record: JobRecord) -> None:
        with self._lock:
            _write_json_atomic(self.dir(record.id) / self.STATE, record.to_json())

    def load(self, job_id: str) -> JobRecord:
        """The job's record; expired jobs are deleted here and reported as not found."""
        path = self.dir(job_id) / self.STATE
        try:
            record = JobRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise JobNotFoundError("no such job (unknown id, deleted, or its result expired)") from None
        expires = record.expires(self.ttl_s)
        if expires is not None and expires <= time.time():
            self.delete(job_id)
            raise JobNotFoundError("no such job (unknown id, deleted, or its result expired)")
        return record

    def update(self, job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
        with self._lock:
            record = self.load(job_id)
            change(record)
            self.save(record)
            return record

    def delete(self, job_id: str) -> None:
        with self._lock:
            shutil.rmtree(self.dir(job_id), ignore_errors=True)

    def records(self) -> Iterator[JobRecord]:
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and _ID.fullmatch(d.name):
                with contextlib.suppress(JobNotFoundError, ValueError, TypeError, KeyError):
                    yield self.load(d.name)

    # housekeeping
    def usage_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += (Path(dirpath) / name).stat().st_size
        return total

    def check_quota(self, incoming: int, *, used: int | None = None) -> None:
        used = self.usage_bytes() if used is None else used
        if used + incoming > self.quota_bytes:
            raise QuotaExceededError(
                f"jobs storage is full: {used / 2**20:,.1f} MiB used + {incoming / 2**20:,.1f} MiB for this upload "
                f"exceeds the quota of {self.quota_bytes / 2**20:,.0f} MiB (UNET_JOBS_QUOTA_MB); "
                "download and DELETE finished jobs, or retry later"
            )

    def expire(self) -> int:
        """Delete finished jobs past their expiry (and uploads that never became jobs)."""
        removed = 0
        now = time.time()
        for d in list(self.root.iterdir()):
            if not (d.is_dir() and _ID.fullmatch(d.name)):
                continue
            state = d / self.STATE
            if not state.exists():
                # an upload in progress has no record yet; one older than an hour was abandoned
                with contextlib.suppress(FileNotFoundError):
                    if now - d.stat().st_mtime > 3600:
                        self.delete(d.name)
                        removed += 1
                continue
            try:
                self.load(d.name)
            except JobNotFoundError:
                removed += 1
            except (ValueError, TypeError, KeyError):
                log.warning("unreadable job record in %s; left alone", d.name)
        return removed

    def remove_partials(self, job_id: str) -> int:
        """Delete the temporary files a writer left in the job's directory; returns how many.

        Under the store's lock, so a record being rewritten at that moment is not touched.
        """
        removed = 0
        with self._lock:
            for pattern in self.PARTIALS:
                for f in self.dir(job_id).glob(pattern):
                    _remove(f)
                    removed += 1
            store = self.dir(job_id) / self.STORE  # an OME-Zarr result not yet zipped
            if store.exists():
                _remove(store)
                removed += 1
        return removed

    def _sweep(self) -> None:
        """What a killed process left: upload directories without a record, stale temporary
        files, and results of jobs that are not done (a rerun writes them again)."""
        uploads = files = 0
        for d in list(self.root.iterdir()):
            if not (d.is_dir() and _ID.fullmatch(d.name)):
                continue
            if not (d / self.STATE).exists():
                self.delete(d.name)  # an upload cut off mid-stream
                uploads += 1
                continue
            files += self.remove_partials(d.name)
            for name in self.RESULTS.values():
                result = d / name
                if result.exists():
                    with contextlib.suppress(JobNotFoundError, ValueError, TypeError, KeyError):
                        if self.load(d.name).state != "done":
                            result.unlink(missing_ok=True)
                            files += 1
        if uploads or files:
            log.info("recovery: deleted %d unfinished upload(s) and %d stale temporary file(s)", uploads, files)

    def recover(self) -> list[str]:
        """After a restart: clean up, and queue again the jobs that were running. Returns their ids.

        Call it only while holding the directory (:meth:`JobWorker.start`'s lock, before any
        request is served): then no upload or run is in progress, and everything a writer
        left is stale (see :meth:`_sweep`). A running job whose upload is gone stopped
        between freeing it and recording its end; it is marked failed (there is nothing left
        to run) rather than queued.
        """
        self._sweep()
        requeued = []
        for record in self.records():
            if record.state == "running" and not self.input_path(record.id).exists():

                def lost(r: JobRecord) -> None:
                    r.state, r.finished = "failed", time.time()
                    r.error = "the server stopped while this job was ending; submit the image again"

                self.update(record.id, lost)
            elif record.state == "running":

                def requeue(r: JobRecord) -> None:
                    r.state, r.tiles_done, r.started = "queued", 0, None

                self.update(record.id, requeue)
                requeued.append(record.id)
        return requeued


class _StopRun(Exception):  # noqa: N818  (control flow, not an error)
    """Raised from the progress callback to abort a run (cancel or shutdown)."""


class _OutOfTime(Exception):  # noqa: N818  (control flow: the job ends failed)
    """Raised from the progress callback when a run is past the worker's ``timeout_s``."""


class JobWorker:
    """Runs queued jobs on ``workers`` threads with one shared :class:`Segmenter`.

    Each job runs through :func:`service.pipeline.segment_file` on the route decided at its
    admission (``stream_above_mb``: decoded size above which it streams). Cancellation,
    shutdown and ``timeout_s`` (seconds since this attempt started; the job then fails) raise
    from the engine's progress callback, so a run stops at its next batch.
    """

    def __init__(
        self,
        store: JobStore,
        segmenter: Segmenter,
        *,
        workers: int = 1,
        stream_above_mb: float = DEFAULT_STREAM_ABOVE_MB,
        max_pixels: int | None = None,
        housekeeping_s: float = 30.0,
        timeout_s: float | None = None,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s or None  # a run past it fails at its next batch; None or 0: no limit
        self.segmenter = segmenter
        self.workers = workers
        self.stream_above_mb = stream_above_mb
        self.max_pixels = max_pixels
        self.housekeeping_s = housekeeping_s
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._claim_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._lock_file: Any = None

    # lifecycle
    def start(self) -> None:
        """Take the jobs directory (one worker process per directory), re-queue, start threads."""
        self._lock_file = open(self.store.root / ".lock", "a")  # noqa: SIM115  (held until stop())
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise JobError(f"jobs directory {self.store.root} is in use by another server process") from None
        requeued = self.store.recover()
        if requeued:
            log.info("re-queued %d job(s) interrupted by the last shutdown", len(requeued))
        self.store.expire()
        for i in range(self.workers):
            t = threading.Thread(target=self._loop, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job stops at its next batch and is queued again."""
        self._stopping.set()
        self.notify()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the directory
            self._lock_file = None

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # requests
    def submit(self, record: JobRecord) -> None:
        record.state = "queued"
        self.store.save(record)
        self.notify()

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job; a finished one is returned unchanged."""
        with self._claim_lock:
            record = self.store.load(job_id)
            if record.state == "queued":

                def cancelled(r: JobRecord) -> None:
                    r.state, r.finished, r.cancel_requested = "cancelled", time.time(), True

                record = self.store.update(job_id, cancelled)
                self.store.input_path(job_id).unlink(missing_ok=True)
            elif record.state == "running":
                self._cancel.add(job_id)
                record = self.store.update(job_id, lambda r: setattr(r, "cancel_requested", True))
        return record

    # the loop
    def _claim(self) -> JobRecord | None:
        with self._claim_lock:
            queued = sorted((r for r in self.store.records() if r.state == "queued"), key=lambda r: r.created)
            if not queued:
                return None

            def running(r: JobRecord) -> None:
                r.state, r.started, r.tiles_done, r.attempts = "running", time.time(), 0, r.attempts + 1

            return self.store.update(queued[0].id, running)

    def _loop(self) -> None:
        last_housekeeping = 0.0
        while not self._stopping.is_set():
            if time.monotonic() - last_housekeeping > self.housekeeping_s:
                last_housekeeping = time.monotonic()
                try:
                    self.store.expire()
                except OSError as e:
                    log.warning("job housekeeping failed: %s", e)
            record = None
            try:
                record = self._claim()
            except OSError as e:  # e.g. a full disk refusing the claim's record: the job stays queued
                log.warning("cannot claim a job: %s", e)
            except Exception:
                log.exception("cannot read the job queue")
            if record is None:
                with self._wake:
                    self._wake.wait(timeout=min(1.0, self.housekeeping_s))
                continue
            try:
                self._run(record)
            except Exception:  # its end could not be recorded (disk full?): recover() settles it at the next start
                log.exception("job %s: cannot record how it ended", record.id)

    def _run(self, record: JobRecord) -> None:
        job_id, store = record.id, self.store
        done, last_save = 0, time.monotonic()
        deadline = None if self.timeout_s is None else last_save + self.timeout_s  # this attempt's
        log.info("job %s started (%d tiles)", job_id, record.tiles_total)

        def progress(n: int) -> None:
            nonlocal done, last_save
            done += n
            if job_id in self._cancel or self._stopping.is_set():
                raise _StopRun
            if deadline is not None and time.monotonic() > deadline:
                raise _OutOfTime
            if time.monotonic() - last_save >= _SAVE_EVERY_S:
                last_save = time.monotonic()
                store.update(job_id, lambda r: setattr(r, "tiles_done", done))

        try:
            self._segment(record, progress)
        except _StopRun:
            if self._stopping.is_set() and job_id not in self._cancel:

                def requeue(r: JobRecord) -> None:
                    r.state, r.tiles_done, r.started = "queued", 0, None

                store.update(job_id, requeue)
                log.info("job %s interrupted by shutdown; queued again", job_id)
                return
            self._finish(job_id, "cancelled", tiles_done=done)
            log.info("job %s cancelled after %d/%d tiles", job_id, done, record.tiles_total)
        except _OutOfTime:
            error = f"the job did not finish within {self.timeout_s:g} s (UNET_JOBS_TIMEOUT_S)"
            self._finish(job_id, "failed", error=error, tiles_done=done)
            log.info("job %s failed after %d/%d tiles: %s", job_id, done, record.tiles_total, error)
        except (ValueError, LookupError) as e:  # InputError, UNetError, TilingError: the input's fault
            self._finish(job_id, "failed", error=str(e), tiles_done=done)
            log.info("job %s failed: %s", job_id, e)
        except Exception as e:
            if is_storage_full(e):  # the writers removed their partial files; the upload goes in _finish
                error = (
                    f"{storage_error(e, 'writing the result')}; delete finished jobs or free space, then submit again"
                )
                log.warning("job %s failed: %s", job_id, error)
                self._finish(job_id, "failed", error=error, tiles_done=done)
            else:
                log.exception("job %s failed unexpectedly", job_id)
                self._finish(job_id, "failed", error="internal error while segmenting", tiles_done=done)
        else:
            size = store.result_path(job_id, record.options.format).stat().st_size
            self._finish(job_id, "done", tiles_done=done, result_bytes=size)
            log.info("job %s done", job_id)
        finally:
            self._cancel.discard(job_id)

    def _finish(
        self, job_id: str, state: State, *, tiles_done: int, error: str | None = None, result_bytes: int = 0
    ) -> None:
        def change(r: JobRecord) -> None:
            r.state, r.finished, r.tiles_done, r.error, r.result_bytes = (
                state,
                time.time(),
                tiles_done,
                error,
                result_bytes,
            )

        # the upload goes first, so a client that sees the final state never finds it still on disk
        self.store.input_path(job_id).unlink(missing_ok=True)
        if state != "done":  # the writers clean up after themselves; this makes sure of it
            self.store.remove_partials(job_id)
        with contextlib.suppress(JobNotFoundError):  # deleted meanwhile
            self.store.update(job_id, change)

    def _segment(self, record: JobRecord, progress: Callable[[int], None]) -> None:
        try:
            self._segment_to_result(record, progress)
        except CancelledError:  # a forward pass dropped by the server's executor as it shut down
            if self._stopping.is_set():
                raise _StopRun from None  # queued again, like any run a shutdown interrupts
            raise

    def _segment_to_result(self, record: JobRecord, progress: Callable[[int], None]) -> None:
        src, opts = self.store.input_path(record.id), record.options
        route = Route.from_json(record.route) if record.route else None  # decided at admission
        if opts.format == "ome-zarr":
            store = self.store.dir(record.id) / self.store.STORE
            segment_file(
                self.segmenter, src, store, opts.pipeline, route=route, max_pixels=self.max_pixels, progress=progress
            )
            try:
                _zip_store(store, self.store.result_path(record.id, opts.format))
            finally:
                _remove(store)
            return
        dst = self.store.result_path(record.id)
        segment_file(
            self.segmenter, src, dst, opts.pipeline, route=route, max_pixels=self.max_pixels, progress=progress
        )


def jobs_dir(settings: Settings) -> Path:
    """``UNET_JOBS_DIR``, or ``<temp dir>/unet-tile-jobs``."""
    return settings.jobs_dir or Path(tempfile.gettempdir()) / "unet-tile-jobs"


def start_jobs(settings: Settings, segmenter: Segmenter) -> JobWorker | None:
    """The app's job worker, started (``None`` when ``UNET_JOBS_WORKERS=0``)."""
    if settings.jobs_workers == 0:
        return None
    store = JobStore(jobs_dir(settings), ttl_s=settings.jobs_ttl_s, quota_bytes=int(settings.jobs_quota_mb * 2**20))
    worker = JobWorker(
        store,
        segmenter,
        workers=settings.jobs_workers,
        stream_above_mb=settings.stream_above_mb,
        max_pixels=settings.jobs_max_pixels,
        housekeeping_s=min(30.0, max(settings.jobs_ttl_s / 4, 0.5)),
        timeout_s=settings.jobs_timeout_s,
    )
    try:
        worker.start()
    except JobError as e:
        log.error("/jobs disabled: %s", e)
        return None
    log.info("job worker started: %d thread(s), storage %s", settings.jobs_workers, store.root)
    return worker
