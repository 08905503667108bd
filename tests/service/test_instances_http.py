"""Instances over HTTP against real ``unet-tile serve`` processes: ``/segment?output=instances``,
``table`` and ``geojson``, and jobs that keep the table and the shapes beside the image."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile

import unet
from service.pipeline import Options, segment_file
from service.segmenter import Segmenter
from unet.synth import synth_image

Server = Any

HEADERS = {"Content-Type": "image/tiff"}


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A synthetic nuclei image and what one machine makes of it (the bundled model, fp32)."""
    d = tmp_path_factory.mktemp("http-instances")
    sample = synth_image(np.random.default_rng([1001, 4]), (430, 400), dtype="uint16")
    tifffile.imwrite(d / "in.tif", sample.image)
    seg = Segmenter(unet.load_checkpoint(unet.checkpoint.DEMO_CHECKPOINT), device="cpu")
    options = Options(output="instances", table=d / "t.csv", geojson=d / "s.geojson")
    report = segment_file(seg, d / "in.tif", d / "inst.tif", options)
    assert report.objects is not None and report.objects > 10
    return {
        "body": (d / "in.tif").read_bytes(),
        "ids": tifffile.imread(d / "inst.tif"),
        "table": (d / "t.csv").read_text(),
        "geojson": json.loads((d / "s.geojson").read_text()),
        "objects": report.objects,
    }


@pytest.fixture(scope="module", params=["in-memory", "streamed"])
def server(
    request: pytest.FixtureRequest, launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Server:
    stream = {"stream_above_mb": "0.01"} if request.param == "streamed" else {}
    jobs = tmp_path_factory.mktemp("jobs")
    return launch(unet.checkpoint.DEMO_CHECKPOINT, device="cpu", precision="fp32", jobs_dir=str(jobs), **stream)


def test_segment_instances_table_and_geojson(server: Server, case: dict[str, Any]) -> None:
    r = server.post("/segment", params={"output": "instances"}, content=case["body"], headers=HEADERS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/tiff" and r.headers["x-object-count"] == str(case["objects"])
    ids = tifffile.imread(io.BytesIO(r.content))
    assert ids.dtype == np.uint32
    np.testing.assert_array_equal(ids, case["ids"])

    r = server.post("/segment", params={"output": "table"}, content=case["body"], headers=HEADERS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv") and r.headers["x-object-count"] == str(case["objects"])
    assert 'filename="objects.csv"' in r.headers["content-disposition"]
    assert r.text == case["table"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == case["objects"] and rows[0]["id"] == "1"

    r = server.post("/segment", params={"output": "geojson"}, content=case["body"], headers=HEADERS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/geo+json"
    assert r.json() == case["geojson"]


def test_min_area(server: Server, case: dict[str, Any]) -> None:
    big = int(np.bincount(case["ids"].ravel())[1:].max())
    r = server.post("/segment", params={"output": "instances", "min_area": big}, content=case["body"], headers=HEADERS)
    assert r.status_code == 200 and r.headers["x-object-count"] == "1"
    for params, message in [
        ({"output": "instances", "min_area": -1}, "greater than or equal to 0"),
        ({"output": "labels", "min_area": 3}, "min_area applies to output=instances"),
    ]:
        r = server.post("/segment", params=params, content=case["body"], headers=HEADERS)
        assert r.status_code == 422 and message in r.text, r.text


def wait_done(server: Server, job_id: str, timeout: float = 120) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job: dict[str, Any] = server.get(f"/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish:\n{server.log_text()}")


def test_a_job_keeps_the_table_and_the_shapes_beside_the_image(server: Server, case: dict[str, Any]) -> None:
    r = server.post("/jobs", params={"output": "instances"}, content=case["body"], headers=HEADERS)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    queued = r.json()
    assert queued["objects"] is None and queued["table_url"] is None
    job = wait_done(server, job_id)
    assert job["state"] == "done", job
    assert job["objects"] == case["objects"]
    assert job["table_url"] == f"/jobs/{job_id}/table" and job["geojson_url"] == f"/jobs/{job_id}/geojson"
    ids = tifffile.imread(io.BytesIO(server.get(job["result_url"]).content))
    np.testing.assert_array_equal(ids, case["ids"])
    table = server.get(job["table_url"])
    assert table.status_code == 200 and table.headers["x-object-count"] == str(case["objects"])
    assert table.text == case["table"]
    shapes = server.get(job["geojson_url"])
    assert shapes.status_code == 200 and shapes.json() == case["geojson"]
    assert httpx.delete(server.url + f"/jobs/{job_id}").status_code == 204
    assert server.get(f"/jobs/{job_id}/table").status_code == 404


def test_a_labels_job_has_no_table(server: Server, case: dict[str, Any]) -> None:
    r = server.post("/jobs", content=case["body"], headers=HEADERS)
    job = wait_done(server, r.json()["id"])
    assert job["state"] == "done" and job["objects"] is None and job["table_url"] is None
    r = server.get(f"/jobs/{job['id']}/table")
    assert r.status_code == 409 and "output=instances" in r.json()["detail"]


def test_the_job_directory_holds_no_spool(server: Server, case: dict[str, Any]) -> None:
    r = server.post("/jobs", params={"output": "instances"}, content=case["body"], headers=HEADERS)
    job = wait_done(server, r.json()["id"])
    jobs_dir = Path(server.env["jobs_dir"]) / job["id"]
    assert sorted(p.name for p in jobs_dir.iterdir()) == [
        "job.json",
        "objects.csv",
        "objects.geojson",
        "preview.bin",
        "result.tif",
    ]
