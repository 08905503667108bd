"""The worker threads that run queued jobs through the pipeline (on this server, or on a Dask
cluster with ``UNET_DASK_SCHEDULER``), and the app's entry point that starts them (:func:`start_jobs`)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..admission import check_scaled
from ..errors import ClusterError, JobError, JobNotFoundError, JobsOffError, is_storage_full, storage_error
from ..io import ImageHeader
from ..paths import default_checkpoint
from ..pipeline import DEFAULT_STREAM_ABOVE_MB, Options, Report, Route, open_input, segment_file
from ..scale import Scale
from ..segmenter import Segmenter
from ..settings import Settings
from .records import JobRecord, State
from .store import JobStore, _remove, _zip_store

__all__ = ["ClusterJobs", "JobWorker", "jobs_dir", "start_jobs"]

log = logging.getLogger("service.jobs")  # the package's logger: service.connections rate-limits its lines

_SAVE_EVERY_S = 0.5  # progress is written to disk at most this often


class _StopRun(Exception):  # noqa: N818  (control flow, not an error)
    """Raised from the progress callback to abort a run (cancel or shutdown)."""


class _OutOfTime(Exception):  # noqa: N818  (control flow: the job ends failed)
    """Raised from the progress callback when a run is past the worker's ``timeout_s``."""


@dataclass(frozen=True)
class ClusterJobs:
    """Where and how jobs run on a Dask cluster (``UNET_DASK_SCHEDULER``): the scheduler, the
    checkpoint every worker loads (same path on every machine) and its device settings."""

    scheduler: str  # tcp://host:8786
    checkpoint: Path
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    backend: str = "auto"
    connect_timeout_s: float = 10.0


def _header(src: Path, series: int = 0) -> ImageHeader:
    """The header of a job's input (parsed again: cheap, no pixel decoded)."""
    with contextlib.closing(open_input(src, series=series)) as source:
        return source.header


class _JobTiles:
    """A run's progress in the job's own tile count (``tiles_total``, counted at admission
    from the whole-image plan).

    An image rescaled to the model's object size (:mod:`service.scale`) takes more or fewer
    tiles than admitted; so may a cluster run:
    the blocks' plans may hold a few tiles more than the whole image's (a tile whose kept
    part crosses into a last block thinner than the tile overlap is run by both blocks), so
    the blocks' tiles are scaled to the admitted total, counted from ``on_open``: the job's
    ``tiles_done`` advances as the blocks finish and ends at exactly ``tiles_total``.

    >>> seen = []
    >>> tiles = _JobTiles(seen.append, 16)
    >>> tiles.opened(18)
    >>> for n in (9, 9): tiles(n)
    >>> seen
    [8, 8]
    """

    def __init__(self, progress: Callable[[int], None], total: int) -> None:
        self.progress, self.total = progress, total
        self.run_total = total  # the blocks' tiles (on_open), until known the same
        self.run_done = self.reported = 0

    def opened(self, run_total: int) -> None:
        self.run_total = max(run_total, 1)

    def __call__(self, n: int) -> None:
        self.run_done += n
        now = min(self.total, self.run_done * self.total // max(self.run_total, 1))
        step, self.reported = now - self.reported, now
        self.progress(step)  # also when 0: it is where cancel, shutdown and the time limit are noticed


class JobWorker:
    """Runs queued jobs on ``workers`` threads with one shared :class:`Segmenter`.

    Each job runs through :func:`service.pipeline.segment_file` on the route decided at its
    admission (``stream_above_mb``: decoded size above which it streams). Cancellation,
    shutdown and ``timeout_s`` (seconds since this attempt started; the job then fails) raise
    from the engine's progress callback, so a run stops at its next batch.

    With ``cluster``, jobs run on that Dask cluster instead
    (:func:`service.cluster.segment_on_cluster`, block by block; the progress callback runs
    as each block finishes and about once a second meanwhile, so a cancel or the time limit
    stops a run within a second: its blocks are cancelled on the cluster). Its route is the cluster's:
    every labels job streams (``stream_above_mb`` is 0, so admission decides the same route).
    One client serves every job, connected at the first one and closed by :meth:`stop`; a
    scheduler that cannot be reached fails the job saying so, and the next job connects again.
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
        cluster: ClusterJobs | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.store = store
        self.settings = settings  # the work limits a rescaled image is held to (None: none)
        self.timeout_s = timeout_s or None  # a run past it fails at its next batch; None or 0: no limit
        self.segmenter = segmenter
        self.workers = workers
        self.cluster = cluster
        # the cluster streams every labels job (segment_on_cluster's own route): admission decides the same
        self.stream_above_mb = 0.0 if cluster is not None else stream_above_mb
        self.max_pixels = max_pixels
        self.housekeeping_s = housekeeping_s
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._objects: dict[str, int] = {}  # instances found by a run that has not been recorded yet
        self._claim_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._lock_file: Any = None
        self._client_lock = threading.Lock()
        self._client: Any = None  # a distributed.Client (the dask extra is optional), made by _cluster_client()
        self._client_exit = contextlib.ExitStack()

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
        self._close_client()  # a job waiting on the cluster's blocks stops now (queued again), not after a block
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
        except ClusterError as e:  # the scheduler unreachable or lost, no usable worker: the message names it
            self._finish(job_id, "failed", error=str(e), tiles_done=done)
            log.warning("job %s failed: %s", job_id, e)
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
            self._finish(
                job_id,
                "done",
                tiles_done=done,
                result_bytes=size,
                objects=self._objects.pop(job_id, None),
                has_preview=store.preview_path(job_id).is_file(),
            )
            log.info("job %s done", job_id)
        finally:
            self._cancel.discard(job_id)

    def _finish(
        self,
        job_id: str,
        state: State,
        *,
        tiles_done: int,
        error: str | None = None,
        result_bytes: int = 0,
        objects: int | None = None,
        has_preview: bool = False,
    ) -> None:
        self._objects.pop(job_id, None)

        def change(r: JobRecord) -> None:
            r.state, r.finished, r.tiles_done, r.error, r.result_bytes, r.objects = (
                state,
                time.time(),
                tiles_done,
                error,
                result_bytes,
                objects,
            )
            r.has_preview = has_preview

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
        pipeline = opts.pipeline
        if opts.output == "instances":  # the table and the shapes beside the image
            pipeline = replace(
                pipeline, table=self.store.table_path(record.id), geojson=self.store.geojson_path(record.id)
            )
        if self.cluster is None:
            route = Route.from_json(record.route) if record.route else None  # decided at admission
            if opts.preview:  # drawn from the tiles as they come (the cluster's blocks are on other machines)
                pipeline = replace(pipeline, preview=self.store.preview_path(record.id))

            tiles = _JobTiles(progress, record.tiles_total)  # a rescaled image takes more or fewer tiles

            def run(dst: Path) -> None:
                report = segment_file(
                    self.segmenter,
                    src,
                    dst,
                    pipeline,
                    route=route,
                    max_pixels=self.max_pixels,
                    progress=tiles,
                    on_open=lambda _h, _r, n: tiles.opened(n),
                    on_scale=lambda s: self._scaled(record.id, s, _header(src, opts.series), opts.tile_size),
                )
                if report.objects is not None:
                    self._objects[record.id] = report.objects

        else:

            def run(dst: Path) -> None:
                report = self._on_cluster(record, src, dst, pipeline, progress)
                if report.scale is not None:
                    self._scaled(record.id, report.scale)
                if report.objects is not None:
                    self._objects[record.id] = report.objects

        if opts.format == "ome-zarr":
            store = self.store.dir(record.id) / self.store.STORE
            try:
                run(store)
                _zip_store(store, self.store.result_path(record.id, opts.format))
            finally:
                _remove(store)
            return
        run(self.store.result_path(record.id))

    def _scaled(self, job_id: str, scale: Scale, header: ImageHeader | None = None, tile_size: int = 388) -> None:
        """The scale chosen for a job, in its status as soon as it is known; an image enlarged
        past the jobs' work limits fails here, before any tile (the message says why)."""
        self.store.update(job_id, lambda r: setattr(r, "scale", scale.to_json()))
        if scale.rescaled and header is not None and self.settings is not None:
            check_scaled(header, scale, self.segmenter.depth, self.settings, tile_size, jobs=True)

    # on a Dask cluster
    def _on_cluster(
        self, record: JobRecord, src: Path, dst: Path, pipeline: Options, progress: Callable[[int], None]
    ) -> Report:
        from ..cluster import segment_on_cluster  # noqa: PLC0415  (the optional dask extra; start_jobs checked it)

        cluster = self.cluster
        assert cluster is not None
        tiles = _JobTiles(progress, record.tiles_total)

        def opened(header: ImageHeader, route: Route, run_tiles: int) -> None:
            tiles.opened(run_tiles)
            if asdict(route) != record.route:  # queued before the cluster was configured: show the route it takes

                def rerouted(r: JobRecord) -> None:
                    r.route, r.streamed = asdict(route), route.streamed

                self.store.update(record.id, rerouted)

        client = self._cluster_client()
        try:
            return segment_on_cluster(
                client,
                cluster.checkpoint,
                src.resolve(),  # the workers' working directory is not this process's
                dst.resolve(),
                pipeline,
                device=cluster.device,
                precision=cluster.precision,
                batch_size=cluster.batch_size,
                backend=cluster.backend,
                max_pixels=self.max_pixels,
                progress=tiles,
                on_open=opened,
            )
        except (_StopRun, _OutOfTime, ClusterError):
            raise
        except Exception as e:
            if self._stopping.is_set():  # stop() closed the client under the run: queued again
                raise _StopRun from None
            if client.status != "running":  # the scheduler went away during the run
                why = " ".join(str(e).split())  # distributed's message spans lines
                raise ClusterError(f"lost the Dask scheduler at {cluster.scheduler} during the job: {why}") from None
            raise

    def _cluster_client(self) -> Any:
        """The worker's client of the scheduler, connected now if it is not (yet, or any more)."""
        from ..cluster import connect  # noqa: PLC0415  (the optional dask extra)

        cluster = self.cluster
        assert cluster is not None
        with self._client_lock:
            if self._stopping.is_set():
                raise _StopRun
            if self._client is not None and self._client.status == "running":
                return self._client
            self._drop_client()
            self._client = self._client_exit.enter_context(
                connect(cluster.scheduler, timeout_s=cluster.connect_timeout_s)
            )  # ClusterError (naming the scheduler) if unreachable: this job fails, the next one tries again
            log.info("jobs connected to the Dask scheduler at %s", cluster.scheduler)
            return self._client

    def _drop_client(self) -> None:
        self._client = None
        try:
            self._client_exit.close()
        except Exception as e:  # a client of a scheduler that is gone may not close cleanly
            log.warning("closing the Dask client: %s", e)

    def _close_client(self) -> None:
        with self._client_lock:
            self._drop_client()


def jobs_dir(settings: Settings) -> Path:
    """``UNET_JOBS_DIR``, or ``<temp dir>/unet-tile-jobs``."""
    return settings.jobs_dir or Path(tempfile.gettempdir()) / "unet-tile-jobs"


def start_jobs(settings: Settings, segmenter: Segmenter) -> JobWorker:
    """The app's job worker, started.

    Raises :class:`JobsOffError` saying why ``/jobs`` is off: ``UNET_JOBS_WORKERS=0``, or
    (also logged as an error) ``UNET_DASK_SCHEDULER`` set without the dask extra, or a jobs
    directory another server process holds. ``/jobs`` then answers 503 with that reason.

    With ``UNET_DASK_SCHEDULER`` the jobs run on that cluster, with the served checkpoint
    (``UNET_CHECKPOINT`` or the bundled one) and ``UNET_DEVICE``/``UNET_PRECISION``/``UNET_BATCH_SIZE``
    applied on the workers.
    """
    if settings.jobs_workers == 0:
        raise JobsOffError("UNET_JOBS_WORKERS=0")
    cluster = None
    if settings.dask_scheduler:
        try:
            importlib.import_module("..cluster", __package__)
        except ImportError as e:  # refused at start: queued jobs and their uploads wait for the fix
            log.error(
                "/jobs disabled: UNET_DASK_SCHEDULER is set but the dask extra is missing"
                " (pip install 'unet-tile[dask]'): %s",
                e,
            )
            raise JobsOffError("UNET_DASK_SCHEDULER is set but the server lacks the dask extra") from None
        cluster = ClusterJobs(
            settings.dask_scheduler,
            Path(settings.checkpoint or default_checkpoint()).resolve(),
            device=settings.device,
            precision=settings.precision,
            batch_size=settings.batch_size,
            backend=settings.backend,
        )
    store = JobStore(jobs_dir(settings), ttl_s=settings.jobs_ttl_s, quota_bytes=int(settings.jobs_quota_mb * 2**20))
    worker = JobWorker(
        store,
        segmenter,
        workers=settings.jobs_workers,
        stream_above_mb=settings.stream_above_mb,
        max_pixels=settings.jobs_max_pixels,
        housekeeping_s=min(30.0, max(settings.jobs_ttl_s / 4, 0.5)),
        timeout_s=settings.jobs_timeout_s,
        cluster=cluster,
        settings=settings,
    )
    try:
        worker.start()
    except JobError as e:
        log.error("/jobs disabled: %s", e)
        raise JobsOffError(str(e)) from None  # its own words (the directory's path is scrubbed from answers)
    where = f"on the Dask scheduler at {cluster.scheduler}" if cluster else "on this server"
    log.info("job worker started: %d thread(s), storage %s, running %s", settings.jobs_workers, store.root, where)
    return worker
