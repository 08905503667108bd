"""The FastAPI application: ``create_app(settings)``; the model arrives in the lifespan.

Nothing heavy happens at import or in :func:`create_app`: the checkpoint is loaded and
warmed up (one forward pass) when the server starts, before it accepts a connection, and
a checkpoint that cannot be loaded stops the start-up (:class:`unet.CheckpointError`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI

from unet import load_checkpoint

from .deps import ServiceState, require_api_key
from .errors import JobsOffError
from .http_errors import install_error_handlers
from .jobs import start_jobs
from .logs import RequestIdMiddleware
from .metrics import MetricsMiddleware
from .paths import default_checkpoint
from .routes import docs, health, jobs, metrics, model, page, segment
from .segmenter import Segmenter
from .settings import Settings, get_settings
from .slots import DeviceSlots

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _load(settings: Settings) -> Segmenter:
    path = settings.checkpoint or default_checkpoint()
    t0 = time.perf_counter()
    segmenter = Segmenter(
        load_checkpoint(path),
        device=settings.device,
        precision=settings.precision,
        batch_size=settings.batch_size,
        backend=settings.backend,
        cache=settings.cache_dir,
    )
    segmenter.warmup()
    log.info(
        "model %s loaded and warmed up on %s (%s, %s) in %.2f s, on thread %s",
        segmenter.checkpoint.sha256[:12],
        segmenter.predictor.device,
        segmenter.predictor.backend,
        segmenter.predictor.precision,
        time.perf_counter() - t0,
        threading.current_thread().name,
    )
    return segmenter


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own state and metrics registry; ``settings`` default to the environment's."""
    settings = settings if settings is not None else get_settings()
    state = ServiceState(
        settings=settings, slots=DeviceSlots(settings.slots, settings.queue_size, settings.retry_after_s)
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model is loaded and warmed up on the thread that will segment: torch's CPU thread
        # pool is per calling thread, and a second, idle pool made every pass ~8 % slower here
        # (OpenMP spins less once it manages more threads than cores).
        state.executor = ThreadPoolExecutor(max_workers=settings.slots, thread_name_prefix="segment")
        try:
            state.segmenter = await asyncio.get_running_loop().run_in_executor(state.executor, _load, settings)
        except Exception as e:
            state.startup_error = e
            log.error("cannot start: %s", e)
            state.executor.shutdown(wait=False)
            raise
        described = state.segmenter.predictor
        state.metrics.model_info.labels(
            state.segmenter.checkpoint.sha256, str(described.device), described.precision
        ).set(1)
        # jobs run their forward passes on the same executor: one torch thread pool in the process
        jobs_segmenter = state.segmenter.running_on(state.executor)
        app.state.jobs, app.state.jobs_off = None, None
        try:
            app.state.jobs = await anyio.to_thread.run_sync(start_jobs, settings, jobs_segmenter)
        except JobsOffError as e:  # /jobs answers 503 saying why; the rest of the service runs
            app.state.jobs_off = str(e)
        state.ready = True
        state.metrics.ready.set(1)
        try:
            yield
        finally:
            state.ready = False
            state.metrics.ready.set(0)
            if app.state.jobs is not None:  # a running job stops at its next batch and is queued again
                await anyio.to_thread.run_sync(app.state.jobs.stop)  # first: its batches need the executor
            executor = state.executor
            await anyio.to_thread.run_sync(lambda: executor.shutdown(wait=True, cancel_futures=True))
            log.info("shut down")

    app = FastAPI(
        title="unet-tile",
        summary="Large-image U-Net segmentation with seam-free overlap-tile inference",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = state
    app.dependency_overrides[get_settings] = lambda: settings
    slots = state.slots
    assert slots is not None
    state.metrics.track(lambda: slots.queued, lambda: slots.running)
    install_error_handlers(app, retry_after_s=settings.retry_after_s)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response and log line has the id
    app.include_router(health.router)
    app.include_router(page.router)  # the page loads without a key; what it asks for needs one
    protected = [Depends(require_api_key)]
    for router in (segment.router, model.router, metrics.router, docs.router, jobs.router):
        app.include_router(router, dependencies=protected)
    return app
