"""Settings of the HTTP service, read from ``UNET_*`` environment variables.

Every field is one variable (``checkpoint`` is ``UNET_CHECKPOINT``); ``unet-tile serve``
flags override them. The fields' descriptions are the documentation: :func:`settings_table`
renders them as the README's settings table (``python -m service.settings`` prints it, and a
test keeps the README's copy equal to it).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "settings_table"]


class Settings(BaseSettings):
    """Typed service configuration; the defaults suit one GPU (or a CPU) per process."""

    model_config = SettingsConfigDict(env_prefix="UNET_", frozen=True, extra="ignore")

    checkpoint: Path | None = Field(default=None, description="checkpoint file to serve; unset: the bundled demo model")
    host: str = Field(default="127.0.0.1", description="address to listen on (`0.0.0.0` in the Docker image)")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="compute device: `auto` (CUDA when there is one, else the CPU), `cpu` or `cuda`"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        default="auto",
        description="`auto` (bf16 on GPUs and CPUs that compute it natively, ~2.5x faster than fp32 on such a CPU"
        " at >= 99.9 % label agreement with fp32 on the demo data; fp32 elsewhere), `fp32` (exact seam-free"
        " tiling), `bf16`, `fp16` (CUDA only), `int8` (OpenVINO only, never chosen by `auto`)",
    )
    backend: Literal["auto", "torch", "openvino"] = Field(
        default="auto",
        description="runtime: `auto` (OpenVINO on the CPU where the `openvino` extra is installed, else PyTorch),"
        " `torch` or `openvino` (CPU only)",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="where the OpenVINO backend keeps the networks it converted, one per checkpoint; unset:"
        " `$XDG_CACHE_HOME/unet-tile` or `~/.cache/unet-tile`",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="tiles per forward pass; unset: chosen for the device (CPU: the fastest micro-batch; CUDA: from"
        " free memory)",
    )
    slots: int = Field(default=1, ge=1, description="segmentations running at once on the device")
    queue_size: int = Field(
        default=4, ge=0, description="segmentations admitted beyond the slots (they wait, FIFO); more get 503"
    )
    retry_after_s: int = Field(default=5, ge=1, description="`Retry-After` (seconds) sent with a 503")
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="time limit of one `/segment` request, upload to answer (408 during the upload, 504 after)",
    )
    max_upload_mb: float = Field(
        default=1024.0, gt=0, description="largest request body (MiB), counted while it arrives"
    )
    spool_mb: float = Field(
        default=8.0, ge=0, description="request bodies larger than this (MiB) are spooled to a temporary file, not RAM"
    )
    spool_dir: Path | None = Field(
        default=None,
        description="where spooled bodies go (deleted when the request ends); unset: the system temp dir",
    )
    max_pixels: int = Field(
        default=16384 * 16384, ge=1, description="most pixels an image may declare, all planes and channels"
    )
    max_image_mb: float = Field(
        default=2048.0, gt=0, description="most MiB the decoded image may take, and separately the result"
    )
    max_tile_size: int = Field(default=1412, ge=4, description="largest `tile_size` a request may ask for")
    max_tiles: int = Field(
        default=4096,
        ge=1,
        description="most tiles one `/segment` request may run (16384² at `tile_size` 388 is 1849)",
    )
    max_work_per_pixel: float = Field(
        default=64.0,
        gt=0,
        description="most network-input pixels a request or job may compute per image pixel (~2.2 at `tile_size`"
        " 388, 2209 at 4; an image counts as at least 1 MiPx)",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="if set, every route except `/healthz` and `/readyz` needs `Authorization: Bearer <key>`",
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="on SIGTERM: stop accepting, let in-flight requests finish this long; what is left gets 503 +"
        " `Retry-After` and its work stops",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="log level: `critical`, `error`, `warning`, `info` or `debug`"
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="log lines: `text`, or `json` (one object per line: time, level, logger, message, request_id);"
        " every response carries `X-Request-ID` (the client's, or a new one)",
    )
    # connections (service.connections): what one process holds, whatever its clients do
    max_connections: int = Field(
        default=8192,
        ge=1,
        description="connections held at once (lowered to fit under `RLIMIT_NOFILE`, whose soft limit is raised to"
        " the hard one at start); past it and 16 more kept for `/healthz` and `/readyz`, an immediate 503 +"
        " `Retry-After`",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request head must be complete this long after connecting or after the previous response;"
        " else the connection is closed (408 if part of a head came)",
    )
    keepalive_timeout_s: float = Field(
        default=5.0, gt=0, description="an idle kept-alive connection is closed after this"
    )
    # jobs (/jobs) and the streamed path for big images
    jobs_dir: Path | None = Field(
        default=None, description="uploads, state and results of jobs; unset: `<temp dir>/unet-tile-jobs`"
    )
    jobs_ttl_s: float = Field(
        default=86400.0, gt=0, description="finished jobs and their results are deleted this long after they end"
    )
    jobs_quota_mb: float = Field(
        default=20480.0, gt=0, description="most MiB the jobs directory may hold; an upload beyond it gets 507"
    )
    jobs_workers: int = Field(
        default=1, ge=0, description="jobs run at once (0 turns `/jobs` off: it answers 503 saying so)"
    )
    jobs_upload_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        description="time limit of one `POST /jobs` upload: past it, 408 and the partial upload is deleted",
    )
    jobs_upload_idle_s: float = Field(
        default=60.0,
        gt=0,
        description="a `POST /jobs` upload that sends nothing for this long gets 408 (and is deleted likewise)",
    )
    jobs_max_pixels: int = Field(default=2**34, ge=1, description="most pixels a streamed job's image may declare")
    jobs_max_tiles: int = Field(
        default=2**18, ge=1, description="most tiles one job may run (131072² at `tile_size` 388 is 116964)"
    )
    jobs_timeout_s: float = Field(
        default=86400.0,
        ge=0,
        description="a job still running this long after it started stops at its next batch and ends `failed`;"
        " 0: no limit",
    )
    dask_scheduler: str | None = Field(
        default=None,
        description="Dask scheduler address (`tcp://host:8786`): `/jobs` run their blocks there, every labels job"
        " on the streamed path (the jobs dir, the checkpoint and the inputs must be on storage every worker reads"
        " at the same path; needs the `dask` extra); unset: on this server",
    )
    stream_above_mb: float = Field(
        default=256.0,
        ge=0,
        description="labels for images whose decoded size exceeds this (MiB) take the streamed path: every job, and"
        " `/segment` uploads spooled to disk (above `UNET_SPOOL_MB`)",
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


def _default_cell(value: object) -> str:
    """A default as the settings table shows it; large square pixel counts also as a side².

    >>> _default_cell(None), _default_cell(300.0), _default_cell("auto")
    ('unset', '`300`', '`auto`')
    >>> _default_cell(16384 * 16384)
    '`268435456` (16384²)'
    """
    if value is None:
        return "unset"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    cell = f"`{value}`"
    if isinstance(value, int) and value >= 2**20 and math.isqrt(value) ** 2 == value:
        cell += f" ({math.isqrt(value)}²)"
    return cell


def settings_table() -> str:
    """The settings as a markdown table: variable, default, description (the README's copy).

    >>> settings_table().splitlines()[2]
    '| `UNET_CHECKPOINT` | unset | checkpoint file to serve; unset: the bundled demo model |'
    """
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `UNET_{name.upper()}` | {_default_cell(field.default)} | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
