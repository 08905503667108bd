"""Prometheus metrics, one registry per app (so several apps, e.g. in tests, never collide)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The service's metrics in their own :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # what every Prometheus client exports: process_* (CPU seconds, resident and virtual
        # memory in bytes, open fds, start time) and python_* (version, garbage collections)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "unet_http_requests",
            "HTTP requests by route, method and status code",
            ["route", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "unet_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tiles = Counter("unet_tiles_processed", "tiles run through the network", registry=r)
        self.pixels = Counter("unet_pixels_processed", "image pixels segmented (Y*X*planes)", registry=r)
        self.segmentations = Counter("unet_segmentations", "segmentation requests by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("unet_queue_depth", "segmentation requests admitted but not running", registry=r)
        self.in_flight = Gauge("unet_in_flight", "segmentations running on the device", registry=r)
        self.ready = Gauge("unet_ready", "1 when the model is loaded and warmed up", registry=r)
        self.model_info = Gauge("unet_model_info", "the loaded model", ["sha256", "device", "precision"], registry=r)

    def track(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        """Read the gauges from live state at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every request by route template (not raw path) and status; times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
