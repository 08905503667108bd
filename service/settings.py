"""Settings of the HTTP service, read from ``UNET_*`` environment variables.

Every field is one variable (``checkpoint`` is ``UNET_CHECKPOINT``); ``unet-tile serve``
flags override them. The README's settings table lists them all.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Typed service configuration; the defaults suit one GPU (or a CPU) per process."""

    model_config = SettingsConfigDict(env_prefix="UNET_", frozen=True, extra="ignore")

    checkpoint: Path | None = Field(default=None, description="checkpoint file; unset means the bundled demo model")
    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0 in the Docker image)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="compute device")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="compute precision; auto: bf16 where the CPU/GPU computes it natively (>= 99.9 % label"
        " agreement with fp32 on the demo data), else fp32; fp32 makes tiling exact",
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="tiles per forward pass; unset: chosen for the device"
    )
    slots: int = Field(default=1, ge=1, description="segmentations running at once on the device")
    queue_size: int = Field(
        default=4, ge=0, description="segmentations admitted beyond the slots (waiting); more get 503"
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After seconds sent with 503")
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="time limit of one /segment request (upload to answer)"
    )
    max_upload_mb: float = Field(
        default=1024.0, gt=0, description="largest request body in MiB, counted while receiving"
    )
    spool_mb: float = Field(default=8.0, ge=0, description="request bodies larger than this (MiB) are spooled to disk")
    spool_dir: Path | None = Field(
        default=None, description="directory for spooled uploads; unset means the system temp dir"
    )
    max_pixels: int = Field(
        default=16384 * 16384, ge=1, description="most pixels an image may declare (all planes/channels)"
    )
    max_image_mb: float = Field(
        default=2048.0, gt=0, description="most MiB the decoded image, and separately the result, may take"
    )
    max_tile_size: int = Field(default=1412, ge=4, description="largest tile_size a request may ask for")
    max_tiles: int = Field(
        default=4096, ge=1, description="most tiles one /segment request may run (16384² at tile 388 is 1849)"
    )
    max_work_per_pixel: float = Field(
        default=64.0,
        gt=0,
        description="most network-input pixels a request or job may compute per image pixel (tile_size 388: ~2.2;"
        " images under 1 MiPx count as 1 MiPx)",
    )
    api_key: SecretStr | None = Field(default=None, description="if set, every route but /healthz and /readyz needs it")
    shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(default="info", description="log level")
    # connections (service.connections): what one process holds, whatever its clients do
    max_connections: int = Field(
        default=8192,
        ge=1,
        description="connections held at once (clamped below RLIMIT_NOFILE); more get an immediate 503",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a request head must be complete this long after connecting or a response"
    )
    keepalive_timeout_s: float = Field(
        default=5.0, gt=0, description="an idle kept-alive connection is closed after this"
    )
    # jobs (/jobs) and the streamed path for big images
    jobs_dir: Path | None = Field(
        default=None, description="job uploads, state and results; unset means <temp dir>/unet-tile-jobs"
    )
    jobs_ttl_s: float = Field(
        default=86400.0, gt=0, description="finished jobs and results are deleted this long after"
    )
    jobs_quota_mb: float = Field(
        default=20480.0, gt=0, description="most MiB the jobs directory may hold; more gets 507"
    )
    jobs_workers: int = Field(default=1, ge=0, description="jobs run at once (0 turns /jobs off)")
    jobs_upload_timeout_s: float = Field(
        default=3600.0, gt=0, description="time limit of one POST /jobs upload; past it, 408 and the upload is deleted"
    )
    jobs_upload_idle_s: float = Field(
        default=60.0, gt=0, description="a POST /jobs upload that sends nothing for this long gets 408"
    )
    jobs_max_pixels: int = Field(default=2**34, ge=1, description="most pixels a streamed job's image may declare")
    jobs_max_tiles: int = Field(
        default=2**18, ge=1, description="most tiles one job may run (131072² at tile 388 is 116964)"
    )
    jobs_timeout_s: float = Field(
        default=86400.0,
        ge=0,
        description="a job still running this long after it started stops at its next batch and fails; 0: no limit",
    )
    stream_above_mb: float = Field(
        default=256.0,
        ge=0,
        description="images whose decoded size exceeds this (MB) take the streamed path (jobs, and /segment"
        " uploads spooled to disk); labels only",
    )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def spool_bytes(self) -> int:
        return int(self.spool_mb * 2**20)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)


@lru_cache
def get_settings() -> Settings:
    """The process's settings (cached); apps and tests may override this dependency."""
    return Settings()
