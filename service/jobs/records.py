"""A job's record: its options, its state and what ``job.json`` holds.

The states a job goes through are drawn in :mod:`service.jobs`.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..pipeline import Options
from ..scale import parse_diameter

__all__ = ["JOB_ID_PATTERN", "JobOptions", "JobRecord", "State"]

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{32}$"
_ID = re.compile(JOB_ID_PATTERN)
State = Literal["queued", "running", "done", "failed", "cancelled"]


@dataclass(frozen=True)
class JobOptions:
    """What to compute; the same options as ``POST /segment``, and the result's format."""

    output: Literal["labels", "probabilities", "instances"] = "labels"
    tile_size: int = 388
    pyramid: bool = False
    series: int = 0  # which image series of the file
    format: Literal["tiff", "ome-zarr"] = "tiff"  # ome-zarr: an OME-Zarr store, downloaded as a zip
    min_area: int | None = None  # instances: drop smaller objects (None: the checkpoint's minimum)
    preview: bool = True  # build the zoomable preview (/jobs/{id}/preview.png, /jobs/{id}/tiles/...)
    diameter: str = "auto"  # the objects' diameter: "auto", "off" or px (service.scale)
    pixel_size: float | None = None  # µm per px: rescale to the model's pixel size
    keep_holes: bool = False  # labels: leave the holes of objects unfilled

    @property
    def pipeline(self) -> Options:
        return Options(
            output=self.output,
            tile_size=self.tile_size,
            pyramid=self.pyramid,
            series=self.series,
            min_area=self.min_area,
            diameter=parse_diameter(self.diameter),
            pixel_size=self.pixel_size,
            fill_holes=not self.keep_holes,
        )


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
    objects: int | None = None  # instances: how many were found
    has_preview: bool = False  # a preview was built (not on a Dask cluster, or with preview=false)
    scale: dict[str, Any] | None = None  # the scale it was segmented at (service.scale.Scale), once known

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
            "objects": self.objects if self.state == "done" else None,
            "scale": self.scale,
            "table_url": f"/jobs/{self.id}/table" if self.state == "done" and self.objects is not None else None,
            "geojson_url": f"/jobs/{self.id}/geojson" if self.state == "done" and self.objects is not None else None,
            "preview_url": f"/jobs/{self.id}/preview" if self.state == "done" and self.has_preview else None,
            "expires": self.expires(ttl_s),
        }
