"""A GeoTIFF's georeferencing comes out on its mask, on every TIFF path: read back by
tifffile's GeoTIFF reader, the same CRS keys, the same transform, the same size."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from service.cli import main

# a UTM zone 33N scene with 10 m pixels, as GDAL writes it
GEO = [
    (33550, 12, 3, (10.0, 10.0, 0.0), True),  # ModelPixelScale
    (33922, 12, 6, (0.0, 0.0, 0.0, 500000.0, 6000000.0, 0.0), True),  # ModelTiepoint
    (
        34735,
        3,
        32,
        (
            1,
            1,
            0,
            7,
            1024,
            0,
            1,
            1,
            1025,
            0,
            1,
            1,
            1026,
            34737,
            25,
            0,
            3072,
            0,
            1,
            32633,
            3076,
            0,
            1,
            9001,
            2049,
            34737,
            7,
            25,
            2054,
            0,
            1,
            9102,
        ),
        True,
    ),  # GeoKeyDirectory
    (34737, 2, 0, "WGS 84 / UTM zone 33N|WGS 84|", True),  # GeoAsciiParams
    (42113, 2, 0, "0", True),  # GDAL_NODATA
]


def geo_of(path: Path) -> dict[str, Any]:
    with tifffile.TiffFile(path) as tif:
        meta = tif.geotiff_metadata
        assert meta is not None, f"{path.name} has no georeferencing"
        nodata = tif.pages.first.tags.get(42113)
        return {**meta, "GDAL_NODATA": nodata and nodata.value, "shape": tif.pages.first.shape}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("geo") / "scene.tif"
    data = np.random.default_rng(0).integers(0, 4000, (300, 420)).astype(np.uint16)
    tifffile.imwrite(path, data, extratags=GEO, tile=(64, 64), compression="zlib")
    return path


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("mask.tif", []),  # in memory
        ("mask.tif", ["--stream-above", "0"]),  # tiled BigTIFF, band by band
        ("mask.ome.tif", ["--pyramid"]),  # pyramidal OME-TIFF: level 0 georeferenced
        ("inst.tif", ["--kind", "instances", "--stream-above", "0"]),
        ("prob.tif", ["--kind", "probabilities"]),
    ],
)
def test_the_mask_keeps_the_scenes_georeferencing(
    scene: Path, tmp_path: Path, tiny_checkpoint: Path, name: str, extra: list[str]
) -> None:
    out = tmp_path / name
    assert main(["segment", str(scene), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "-q", *extra]) == 0
    want, got = geo_of(scene), geo_of(out)
    assert want["ProjectedCSTypeGeoKey"] == got["ProjectedCSTypeGeoKey"]  # EPSG:32633
    for key in ("ModelPixelScale", "ModelTiepoint", "GTModelTypeGeoKey", "GTRasterTypeGeoKey", "GTCitationGeoKey"):
        assert got[key] == want[key], key
    assert got["GDAL_NODATA"] == want["GDAL_NODATA"]
    assert got["shape"][-2:] == want["shape"][-2:] == (300, 420)


def test_segment_over_http_keeps_it_too(scene: Path, tiny_checkpoint: Path, launch: Callable[..., Any]) -> None:
    server = launch(tiny_checkpoint, device="cpu", jobs_workers="0")
    r = server.post("/segment", content=scene.read_bytes(), headers={"Content-Type": "image/tiff"})
    assert r.status_code == 200, r.text
    with tifffile.TiffFile(io.BytesIO(r.content)) as tif:
        assert tif.geotiff_metadata["ModelTiepoint"] == geo_of(scene)["ModelTiepoint"]
