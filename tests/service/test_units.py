"""One unit for every ``UNET_*_MB`` setting: MiB (2**20 bytes), in what it does and what it says."""

from __future__ import annotations

import numpy as np

from service.io import ImageHeader
from service.pipeline import Options, choose_route
from service.settings import Settings


def test_every_mb_setting_says_mib() -> None:
    fields = {name: f for name, f in Settings.model_fields.items() if name.endswith("_mb")}
    assert {"max_upload_mb", "spool_mb", "max_image_mb", "jobs_quota_mb", "stream_above_mb"} <= set(fields)
    for name, field in fields.items():
        assert "MiB" in (field.description or ""), name


def test_stream_above_counts_mib() -> None:
    exactly = ImageHeader((1024, 1024), "YX", np.dtype("uint8"), None, None, None)  # 1 MiB decoded
    above = ImageHeader((1024, 1025), "YX", np.dtype("uint8"), None, None, None)
    assert choose_route(exactly, Options(), stream_above_mb=1).read == "decoded"
    assert choose_route(above, Options(), stream_above_mb=1).read == "windowed"
    assert Settings(stream_above_mb=1.5).stream_above_mb == 1.5
