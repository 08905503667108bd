"""Start-up, readiness, settings and graceful shutdown."""

from __future__ import annotations

import argparse
import io
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import tifffile

from service.app import create_app
from service.cli.serve import register, settings_from_args
from service.settings import Settings, get_settings
from tests.service.conftest import LONG_JOB_LIMITS


def test_settings_come_from_unet_variables_and_flags_override_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNET_PORT", "9001")
    monkeypatch.setenv("UNET_SLOTS", "3")
    monkeypatch.setenv("UNET_API_KEY", "topsecret-7")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    settings = settings_from_args(parser.parse_args(["serve", "--port", "9100", "--max-upload-mb", "2"]))
    assert settings.port == 9100 and settings.max_upload_bytes == 2 * 2**20  # flags win
    assert settings.slots == 3 and settings.api_key is not None and settings.api_key.get_secret_value() == "topsecret-7"
    assert settings.host == "127.0.0.1" and settings.queue_size == 4  # defaults
    assert "topsecret-7" not in repr(settings)  # the key is never printed


def test_invalid_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNET_SLOTS", "0")
    with pytest.raises(ValueError, match="slots"):
        Settings()


def test_nothing_is_loaded_before_the_lifespan_and_readyz_says_so(small_checkpoint: Path) -> None:
    """The app object is cheap; until its lifespan runs /readyz and the model routes answer 503."""
    app = create_app(Settings(checkpoint=small_checkpoint))
    assert app.state.service.segmenter is None

    async def probe() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the model is never loaded
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get(p) for p in ("/healthz", "/readyz", "/model")]

    health, ready, model = anyio.run(probe)
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.json()["detail"].startswith("not ready")
    assert model.status_code == 503 and model.headers["retry-after"] == "1"


def test_the_model_is_loaded_on_the_thread_that_segments(
    small_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """torch's CPU thread pool is per calling thread: loading elsewhere left a second, idle
    pool that made every pass ~8 % slower. The load runs on the segmentation executor."""
    app = create_app(Settings(checkpoint=small_checkpoint, device="cpu"))

    async def lifespan() -> str:
        async with app.router.lifespan_context(app):
            executor = app.state.service.executor
            return str(executor.submit(lambda: threading.current_thread().name).result())

    with caplog.at_level(logging.INFO, logger="service.app"):
        segment_thread = anyio.run(lifespan)
    loaded = [r.getMessage() for r in caplog.records if "loaded and warmed up" in r.getMessage()]
    assert segment_thread.startswith("segment") and loaded[0].endswith(f"on thread {segment_thread}")


def test_get_settings_is_a_dependency_tests_can_override(small_checkpoint: Path) -> None:
    app = create_app(Settings(checkpoint=small_checkpoint, api_key="abc"))
    assert app.dependency_overrides[get_settings]().api_key.get_secret_value() == "abc"


def _serve(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )


def test_a_bad_checkpoint_stops_the_start_with_one_line(tmp_path: Path) -> None:
    missing = _serve(["--checkpoint", str(tmp_path / "nope.safetensors")], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("nope.safetensors")
    assert "unet-tile: error: checkpoint not found:" in missing.stderr

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    run = _serve(["--checkpoint", str(corrupt)], tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("unet-tile: error: ")
    assert "Application startup failed" in run.stderr


def test_sigterm_finishes_in_flight_work_then_stops_the_rest(
    launch: Callable[..., Any], small_checkpoint: Path, long_job: bytes, to_tiff: Callable[..., bytes]
) -> None:
    server = launch(small_checkpoint, slots="2", shutdown_timeout_s="8", **LONG_JOB_LIMITS)
    medium = to_tiff(np.random.default_rng(0).integers(0, 255, (144, 144), dtype=np.uint8))  # 81 tiles at tile_size 20
    results: dict[str, Any] = {}

    def post(name: str, body: bytes) -> None:
        try:
            results[name] = httpx.post(server.url + "/segment", params={"tile_size": 20}, content=body, timeout=60)
        except httpx.HTTPError as e:
            results[name] = e

    threads = [threading.Thread(target=post, args=a) for a in (("long", long_job), ("medium", medium))]
    threads[0].start()
    server.wait_until(lambda s: s["running"] == 1)
    threads[1].start()
    server.wait_until(lambda s: s["running"] == 2)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    took = time.monotonic() - t0
    for t in threads:
        t.join(timeout=60)
    assert code == -signal.SIGTERM  # uvicorn re-raises the signal once its clean shutdown is done
    medium_response = results["medium"]
    assert isinstance(medium_response, httpx.Response) and medium_response.status_code == 200
    assert tifffile.imread(io.BytesIO(medium_response.content)).shape == (144, 144)
    # the long one was cut off after the grace period, and its worker stopped (else no exit)
    assert not (isinstance(results["long"], httpx.Response) and results["long"].status_code == 200)
    print(f"SIGTERM to exit: {took:.1f} s (grace 8 s)")
    log = server.log_text()
    assert "Shutting down" in log and "Application shutdown complete" in log
    assert "Future exception was never retrieved" not in log


def test_readme_documents_every_setting(readme: str) -> None:
    """Each UNET_* variable has a row in a settings table (the service section's, or the jobs section's)."""
    for name in Settings.model_fields:
        assert f"| `UNET_{name.upper()}` |" in readme, name
