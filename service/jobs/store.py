"""The on-disk job store: one directory per job, its record rewritten atomically, expiry,
the byte quota and the clean-up after a restart."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from unet.atomic import atomic_path

from ..errors import InvalidJobIdError, JobNotFoundError, QuotaExceededError
from .records import _ID, JobRecord

__all__ = ["JobStore"]

log = logging.getLogger("service.jobs")  # the package's logger: service.connections rate-limits its lines


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:  # atomic_path fsyncs it, then the directory
        json.dump(data, f)


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
    TABLE, GEOJSON = "objects.csv", "objects.geojson"  # beside an instances result
    PREVIEW = "preview.bin"  # the zoomable preview (service.preview)
    PARTIALS = (".*.part", ".level*.raw", ".instances*.spool")  # what the writers leave if the process dies mid-write

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

    def table_path(self, job_id: str) -> Path:
        return self.dir(job_id) / self.TABLE

    def geojson_path(self, job_id: str) -> Path:
        return self.dir(job_id) / self.GEOJSON

    def preview_path(self, job_id: str) -> Path:
        return self.dir(job_id) / self.PREVIEW

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
            for name in (*self.RESULTS.values(), self.TABLE, self.GEOJSON, self.PREVIEW):
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
