"""What ``pip install unet-tile`` brings beside the code: the page and the demo model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_page_and_the_demo_model(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("unet_tile-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "service/static/index.html",
        "service/static/app.js",
        "service/static/app.css",
        "unet/weights/demo-nuclei.safetensors",
        "service/py.typed",
        "unet_tile/__init__.py",
    ):
        assert name in names, f"{name} missing from {wheel.name}"
