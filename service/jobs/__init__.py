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

Modules: :mod:`~service.jobs.records` (:class:`JobOptions`, :class:`JobRecord`, the states),
:mod:`~service.jobs.store` (:class:`JobStore`, the directory on disk) and
:mod:`~service.jobs.worker` (:class:`JobWorker`, the threads, and :func:`start_jobs` for the app).

Errors: :class:`service.errors.JobError` and its subclasses (malformed id, not found, not
ready, quota), mapped to HTTP by :mod:`service.http_errors`.
"""

from __future__ import annotations

from .records import JOB_ID_PATTERN, JobOptions, JobRecord, State
from .store import JobStore
from .worker import JobWorker, jobs_dir, start_jobs

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
