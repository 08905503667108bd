"""End to end against a real ``unet-tile serve``: masks equal the CLI's, headers, /model,
/metrics, OpenAPI, and the event loop stays free during a long segmentation."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
import torch

import tiling
from service.cli import build_parser
from service.cli import main as cli_main
from service.settings import Settings
from tests.service.conftest import LONG_JOB_LIMITS
from unet import file_sha256

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "segment-folder.sh"


@pytest.fixture(scope="module")
def server(launch: Callable[..., Any], small_checkpoint: Path) -> Any:
    return launch(small_checkpoint, **LONG_JOB_LIMITS)


def cli_mask(tmp_path: Path, checkpoint: Path, data: bytes, *args: str) -> np.ndarray[Any, Any]:
    src, out = tmp_path / "in.tif", tmp_path / "cli-out.tif"
    src.write_bytes(data)
    argv = ["segment", str(src), "-o", str(out), "--checkpoint", str(checkpoint), "--precision", "fp32", "-q"]
    assert cli_main([*argv, *args]) == 0
    return tifffile.imread(out)


def decode(r: httpx.Response) -> tuple[np.ndarray[Any, Any], tifffile.TiffFile]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/tiff"
    tif = tifffile.TiffFile(io.BytesIO(r.content))
    return tif.asarray(), tif


def test_raw_and_multipart_uploads_give_the_cli_mask(
    server: Any, small_checkpoint: Path, tmp_path: Path, to_tiff: Callable[..., bytes]
) -> None:
    image = np.random.default_rng(0).integers(0, 4000, (300, 500), dtype=np.uint16)
    data = to_tiff(image, resolution=(2.5, 2.5), resolutionunit="CENTIMETER")
    expected = cli_mask(tmp_path, small_checkpoint, data)
    assert len(np.unique(expected)) == 2  # a real mask, not a constant

    raw = server.post("/segment", content=data, headers={"Content-Type": "image/tiff"})
    multipart = server.post("/segment", files={"file": ("x.tif", data, "image/tiff")})
    for r in (raw, multipart):
        mask, tif = decode(r)
        assert mask.dtype == np.uint8 and mask.shape == (300, 500)
        np.testing.assert_array_equal(mask, expected)
        page = tif.pages[0]
        assert page.compression != 1  # compressed
        assert page.get_resolution() == pytest.approx((2.5, 2.5))
        assert r.headers["x-model-sha256"] == file_sha256(small_checkpoint)
        assert r.headers["x-tiles"] == "2"
        timing = r.headers["server-timing"]
        assert all(f"{k};dur=" in timing for k in ("decode", "infer", "encode"))


def test_stack_probabilities_and_tile_size_match_the_cli(
    server: Any, small_checkpoint: Path, tmp_path: Path, to_tiff: Callable[..., bytes]
) -> None:
    stack = np.random.default_rng(1).integers(0, 255, (2, 120, 90), dtype=np.uint8)
    data = to_tiff(stack, metadata={"axes": "ZYX"})
    expected = cli_mask(tmp_path, small_checkpoint, data, "--output", "probabilities", "--tile-size", "404")
    r = server.post("/segment", params={"output": "probabilities", "tile_size": 404}, content=data)
    probs, tif = decode(r)
    assert probs.dtype == np.float32 and probs.shape == (2, 2, 120, 90) == expected.shape
    np.testing.assert_array_equal(probs, expected)
    assert tif.series[0].axes == "ZCYX"
    assert r.headers["x-tiles"] == "2"  # one tile per plane


def test_model_describes_the_checkpoint(server: Any, small_checkpoint: Path) -> None:
    r = server.get("/model")
    assert r.status_code == 200
    body = r.json()
    assert body["sha256"] == file_sha256(small_checkpoint)
    assert body["config"]["base_width"] == 4 and body["config"]["depth"] == 4
    assert body["class_names"] == ["background", "nucleus"]
    assert body["tile"] == {"output": 388, "input": 572, "margin": 92, "period": 16}
    assert body["device"] == "cpu" and body["precision"] == "fp32"
    assert 388 in body["tile_sizes"] and 390 not in body["tile_sizes"]


def test_default_precision_is_auto_and_the_server_reports_what_it_resolved(
    launch: Callable[..., Any], small_checkpoint: Path, tmp_path: Path, to_tiff: Callable[..., bytes]
) -> None:
    """Unset, UNET_PRECISION is ``auto``: bf16 where this CPU computes it natively, else fp32."""
    assert Settings().precision == "auto"
    assert build_parser().parse_args(["segment", "a.tif", "-o", "b.tif"]).precision == "auto"
    server = launch(small_checkpoint, precision="auto")
    assert server.get("/model").json()["precision"] == tiling.resolve_precision("auto", torch.device("cpu"))
    data = to_tiff(np.random.default_rng(1).integers(0, 4000, (300, 260), dtype=np.uint16))
    mask, _ = decode(server.post("/segment", content=data, headers={"content-type": "image/tiff"}))
    np.testing.assert_array_equal(mask, cli_mask(tmp_path, small_checkpoint, data, "--precision", "auto"))


def test_openapi_documents_both_upload_forms(server: Any) -> None:
    spec = server.get("/openapi.json").json()
    body = spec["paths"]["/segment"]["post"]["requestBody"]["content"]
    assert {"image/tiff", "multipart/form-data"} <= set(body)
    params = {p["name"] for p in spec["paths"]["/segment"]["post"]["parameters"]}
    assert params == {"output", "tile_size", "series", "min_area", "diameter", "pixel_size", "keep_holes"}
    docs = server.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_metrics_count_requests_tiles_and_queue(server: Any, to_tiff: Callable[..., bytes]) -> None:
    data = to_tiff(np.zeros((64, 64), np.uint8))
    assert server.post("/segment", content=data).status_code == 200
    assert server.post("/segment", content=b"not a tiff").status_code == 415
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'unet_http_requests_total{code="200",method="POST",route="/segment"}' in text
    assert 'unet_http_requests_total{code="415",method="POST",route="/segment"}' in text
    assert 'unet_http_request_duration_seconds_bucket{le="0.1",route="/segment"}' in text
    for name in (
        "unet_tiles_processed_total",
        "unet_pixels_processed_total",
        "process_resident_memory_bytes",
        "unet_queue_depth",
        "unet_in_flight",
    ):
        assert f"\n{name} " in text
    assert "\npython_info{" in text and "\npython_gc_collections_total{" in text
    tiles = float(text.split("\nunet_tiles_processed_total ")[1].split()[0])
    assert tiles >= 1
    assert "unet_ready 1.0" in text


def _metric(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_and_metrics_answer_during_a_long_segmentation_and_a_client_leaving_abandons_it(
    server: Any, long_job: bytes, raw_request: Callable[..., Any]
) -> None:
    at_start = _metric(server.get("/metrics").text, "unet_tiles_processed_total ")
    job = raw_request(server, "/segment?tile_size=20", long_job)  # 15625 tiles: minutes of work
    server.wait_until(lambda s: s["running"] == 1)
    latencies = []
    for path in ("/healthz", "/metrics", "/healthz", "/readyz"):
        t0 = time.perf_counter()
        r = server.get(path, timeout=5)  # a blocked event loop would time out here
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200
    print("health/metrics latencies during a segmentation (ms):", [round(x * 1000, 1) for x in latencies])
    tiles_before = _metric(server.get("/metrics").text, "unet_tiles_processed_total ")

    job.close()  # the client walks away
    server.wait_until(lambda s: s["running"] == 0 and s["queued"] == 0, timeout=30)
    text = server.get("/metrics").text
    assert _metric(text, 'unet_segmentations_total{outcome="ClientDisconnectedError"}') == 1
    tiles_after = _metric(text, "unet_tiles_processed_total ")
    time.sleep(0.5)
    assert _metric(server.get("/metrics").text, "unet_tiles_processed_total ") == tiles_after  # really stopped
    assert tiles_after >= tiles_before
    assert tiles_after - at_start < 15625  # abandoned before its end
    assert server.get("/healthz").status_code == 200


def test_batch_script_segments_a_folder_and_reports_failures(
    server: Any, small_checkpoint: Path, tmp_path: Path, to_tiff: Callable[..., bytes]
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        (src / f"img{i}.tif").write_bytes(to_tiff(rng.integers(0, 255, (80 + 10 * i, 70), dtype=np.uint8)))
    (src / "broken.tif").write_bytes(b"this is not a TIFF")
    (src / "notes.txt").write_text("ignored: not a .tif")
    run = subprocess.run(
        ["bash", str(SCRIPT), "-u", server.url, "-j", "2", str(src), str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "FAIL  broken.tif: HTTP 415" in run.stderr and "1 of 4 file(s) failed" in run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img0.tif", "img1.tif", "img2.tif"]  # no .part left behind
    for i in range(3):
        expected = cli_mask(tmp_path, small_checkpoint, (src / f"img{i}.tif").read_bytes())
        np.testing.assert_array_equal(tifffile.imread(out / f"img{i}.tif"), expected)


def test_without_an_api_key_no_route_needs_one(server: Any) -> None:
    assert server.get("/model").status_code == 200
    assert server.get("/model", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_large_uploads_take_the_streamed_path_with_the_same_mask(
    launch: Callable[..., Any], small_checkpoint: Path, tmp_path: Path, to_tiff: Callable[..., bytes]
) -> None:
    """Uploads spooled to disk above UNET_STREAM_ABOVE_MB are segmented window by window
    into a tiled BigTIFF; the pixels equal the in-memory CLI's (forced here with 0 MB)."""
    streaming = launch(small_checkpoint, spool_mb="0", stream_above_mb="0")
    image = np.random.default_rng(5).integers(0, 4000, (700, 420), dtype=np.uint16)
    data = to_tiff(image, tile=(256, 256))
    expected = cli_mask(tmp_path, small_checkpoint, data, "--stream-above", "1000")
    for r in (
        streaming.post("/segment", content=data, headers={"Content-Type": "image/tiff"}),
        streaming.post("/segment", files={"file": ("x.tif", data, "image/tiff")}),
    ):
        mask, tif = decode(r)
        assert tif.is_bigtiff and tif.pages[0].is_tiled  # the streamed writer's layout
        np.testing.assert_array_equal(mask, expected)
    assert len(np.unique(expected)) == 2
