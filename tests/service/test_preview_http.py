"""A job's preview over HTTP against a real ``unet-tile serve`` on 127.0.0.1: its description,
the overview PNG within its size bound, tiles of every level, and clear answers otherwise."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

import unet
from tests.conftest import balance_classes

Server = Any


def blobs(shape: tuple[int, int], seed: int = 0) -> np.ndarray[Any, Any]:
    a = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 4)
    return ((a - a.min()) / (a.max() - a.min()) * 4000).astype(np.uint16)


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    torch.manual_seed(5)
    model = unet.UNet(unet.UNetConfig(depth=2, base_width=4)).eval()
    balance_classes(model, torch.from_numpy(blobs((160, 160), seed=9)[None, None].astype(np.float32) / 4000))
    path = tmp_path_factory.mktemp("ck") / "ck.safetensors"
    unet.save_checkpoint(path, model, class_names=["background", "nucleus"])
    return launch(path, jobs_dir=str(tmp_path_factory.mktemp("jobs")), batch_size="4", device="cpu")


def run_job(server: Server, body: bytes, **params: Any) -> dict[str, Any]:
    r = server.post("/jobs", params=params, content=body, headers={"Content-Type": "image/tiff"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    end = time.monotonic() + 120
    while time.monotonic() < end:
        job: dict[str, Any] = server.get(f"/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            assert job["state"] == "done", job
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def tiff(data: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, compression="zlib")
    return buf.getvalue()


def test_preview_description_overview_and_tiles(server: Server, tmp_path: Path) -> None:
    data = blobs((700, 1100))
    job = run_job(server, tiff(data), tile_size=196)
    assert job["preview_url"] == f"/jobs/{job['id']}/preview" and job["options"]["preview"] is True
    meta = server.get(job["preview_url"]).json()
    assert (meta["width"], meta["height"], meta["tile"], meta["kind"]) == (1100, 700, 256, "labels")
    assert [lv["shape"] for lv in meta["levels"]] == [[700, 1100], [350, 550], [175, 275], [88, 138]]
    assert meta["classes"][1] == {"value": 1, "name": "nucleus", "rgb": [230, 25, 75]}
    mask = tifffile.imread(io.BytesIO(server.get(job["result_url"]).content))
    for max_size, shape in ((256, (88, 138)), (1024, (350, 550)), (4096, (700, 1100))):
        r = server.get(f"/jobs/{job['id']}/preview.png", params={"max_size": max_size})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        png = imagecodecs.png_decode(r.content)
        assert png.shape == (*shape, 3) and max(shape) <= max_size
    f = 2  # the 1024 overview is level 1: its outlines are those of every 2nd label
    v = mask[::f, ::f]
    cross = ndimage.generate_binary_structure(2, 1)
    edge = (
        ndimage.minimum_filter(v, footprint=cross, mode="nearest")
        != ndimage.maximum_filter(v, footprint=cross, mode="nearest")
    ) & (v != 0)
    png = imagecodecs.png_decode(server.get(f"/jobs/{job['id']}/preview.png").content)
    coloured = ~((png[..., 0] == png[..., 1]) & (png[..., 1] == png[..., 2]))
    np.testing.assert_array_equal(coloured, edge)
    for layer, channels in (("overlay", 3), ("image", 3), ("outline", 4), ("fill", 4)):
        r = server.get(meta["tiles_url"].format(level=0, y=2, x=4), params={"layer": layer})
        assert r.status_code == 200, r.text
        assert imagecodecs.png_decode(r.content).shape == (700 - 512, 1100 - 1024, channels)
    fill = imagecodecs.png_decode(
        server.get(meta["tiles_url"].format(level=0, y=0, x=0), params={"layer": "fill"}).content
    )
    np.testing.assert_array_equal(fill[..., 3] == 255, mask[:256, :256] == 1)
    missing = server.get(meta["tiles_url"].format(level=0, y=3, x=0))
    assert missing.status_code == 404 and missing.json() == {"detail": "no tile 3/0 at level 0; it has 3 x 5 tiles"}
    assert server.get(meta["tiles_url"].format(level=7, y=0, x=0)).json() == {
        "detail": "no level 7 in this preview; levels are 0..3"
    }
    assert server.get(f"/jobs/{job['id']}/preview.png", params={"max_size": 10}).status_code == 422
    assert server.get(f"/jobs/{job['id']}/preview.png", params={"style": "glow"}).status_code == 422


def test_instances_and_no_preview_jobs(server: Server) -> None:
    data = blobs((300, 300), seed=2)
    job = run_job(server, tiff(data), output="instances", tile_size=196)
    meta = server.get(job["preview_url"]).json()
    assert meta["kind"] == "instances" and [c["name"] for c in meta["classes"]] == ["background", "object"]
    job = run_job(server, tiff(data), preview="false", tile_size=196)
    assert job["preview_url"] is None and job["options"]["preview"] is False
    for path in ("preview", "preview.png", "tiles/0/0/0.png"):
        r = server.get(f"/jobs/{job['id']}/{path}")
        assert r.status_code == 409
        assert r.json() == {"detail": f"job {job['id']} has no preview: it was submitted with preview=false"}


def test_the_page_and_its_files_come_from_this_server_only(server: Server) -> None:
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"].startswith("default-src 'self';")
    for name, media in (("app.js", "text/javascript"), ("app.css", "text/css")):
        r = server.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media)
        assert f'/static/{name}"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
    assert "https://" not in server.get("/static/app.js").text
