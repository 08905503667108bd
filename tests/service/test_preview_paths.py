"""The preview on every route of the pipeline and from the CLI: the same pyramid whichever way
the result is read and written, showing the labels (or instances) the output holds."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

import unet
from service.cli import main
from service.pipeline import Options, segment_file
from service.preview import OUTLINE, TILE, Preview
from service.segmenter import Segmenter
from tests.conftest import balance_classes

SHAPE = (530, 610)  # three levels; tiles of 100 cross both chunk and tile borders
ZARR = importlib.util.find_spec("ome_zarr") is not None
CROSS = ndimage.generate_binary_structure(2, 1)


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    a = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 4)
    return ((a - a.min()) / (a.max() - a.min()) * 4000).astype(np.uint16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(5)
    model = unet.UNet(unet.UNetConfig(in_channels=1, depth=2, base_width=4)).eval()
    balance_classes(model, torch.from_numpy(blobs((1, 1, 160, 160), seed=9).astype(np.float32) / 4000))
    path = tmp_path_factory.mktemp("ck") / "ck.safetensors"
    unet.save_checkpoint(path, model, class_names=["background", "nucleus"])
    return path


@pytest.fixture(scope="module")
def segmenter(checkpoint: Path) -> Segmenter:
    return Segmenter(unet.load_checkpoint(checkpoint), device="cpu", precision="fp32", batch_size=3)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "in.tif"
    tifffile.imwrite(path, blobs(SHAPE), tile=(64, 64), compression="zlib")
    return path


def assembled(preview: Preview, k: int) -> np.ndarray[Any, Any]:
    info = preview.levels[k]
    out = np.zeros((2, *info["shape"]), np.uint8)
    for ty in range(info["grid"][0]):
        for tx in range(info["grid"][1]):
            c = preview.chunk(k, ty, tx)
            out[:, ty * TILE : ty * TILE + c.shape[1], tx * TILE : tx * TILE + c.shape[2]] = c
    return out


ROUTES = [
    ("labels", "out.tif", 1e9),  # decoded, in memory
    ("labels", "out.tif", 0),  # windowed, tiled BigTIFF
    ("labels", "out.ome.tif", 0),  # pyramidal OME-TIFF
    ("probabilities", "out.tif", 1e9),  # shown as their labels
    ("instances", "out.tif", 1e9),
    ("instances", "out.tif", 0),
    pytest.param(
        "labels", "out.ome.zarr", 0, marks=pytest.mark.skipif(not ZARR, reason="OME-Zarr needs the ome-zarr extra")
    ),
]


@pytest.mark.parametrize(("output", "name", "stream_above"), ROUTES)
def test_every_route_gives_the_same_preview_of_its_output(
    segmenter: Segmenter, image: Path, tmp_path: Path, output: str, name: str, stream_above: float
) -> None:
    options = Options(output=output, tile_size=100, pyramid=name == "out.ome.tif", preview=tmp_path / "p.bin")  # type: ignore[arg-type]
    report = segment_file(segmenter, image, tmp_path / name, options, stream_above_mb=stream_above)
    assert report.route.streamed == (stream_above == 0)
    reference = segment_file(segmenter, image, tmp_path / "ref.tif", Options(output="labels", tile_size=100))
    assert reference.route.write == "memory"
    labels = tifffile.imread(tmp_path / "ref.tif")
    preview = Preview(tmp_path / "p.bin")
    base = assembled(preview, 0)
    raw = tifffile.imread(image)
    affine = segmenter.checkpoint.normalization.fit(raw[np.newaxis])
    expected = np.floor(affine.stretch(raw[np.newaxis])[0] * 255 + 0.5).astype(int)
    assert np.abs(base[0].astype(int) - expected).max() <= 1  # the input as the network saw it, to rounding
    if output == "instances":
        ids = tifffile.imread(tmp_path / name)
        np.testing.assert_array_equal(base[1] & 0x7F, ids > 0)
        shown = ids
    else:  # probabilities: their argmax, which may part from the labels at a near-tie
        shown = labels if output == "labels" else tifffile.imread(tmp_path / name).argmax(axis=0).astype(np.uint8)
        np.testing.assert_array_equal(base[1] & 0x7F, shown)
    for k in range(len(preview.levels)):
        v = shown[:: 2**k, :: 2**k]
        edge = (
            ndimage.minimum_filter(v, footprint=CROSS, mode="nearest")
            != ndimage.maximum_filter(v, footprint=CROSS, mode="nearest")
        ) & (v != 0)
        np.testing.assert_array_equal((assembled(preview, k)[1] & OUTLINE) != 0, edge)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == []


def test_a_failed_run_leaves_no_preview(segmenter: Segmenter, image: Path, tmp_path: Path) -> None:
    def stop(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        from service.pipeline import choose_route, open_input, open_sink, segment

        options = Options(tile_size=100, preview=tmp_path / "p.bin")
        with open_input(image) as source:
            route = choose_route(source.header, options, stream_above_mb=0)
            source.windowed()
            sink = open_sink(route, tmp_path / "out.tif", source.header, segmenter, options, source=source)
            segment(segmenter, source, sink, options, stop)
    assert list(tmp_path.iterdir()) == []


def test_cli_preview_png(checkpoint: Path, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["segment", str(image), "-o", str(tmp_path / "m.tif"), "--checkpoint", str(checkpoint), "-q"]
    assert main([*args, "--preview", str(tmp_path / "o.png"), "--preview-size", "320"]) == 0
    png = imagecodecs.png_decode((tmp_path / "o.png").read_bytes())
    assert png.shape == (265, 305, 3)  # level 1 of 530 x 610: the finest that fits in 320
    mask = tifffile.imread(tmp_path / "m.tif")[::2, ::2]
    edge = (
        ndimage.minimum_filter(mask, footprint=CROSS, mode="nearest")
        != ndimage.maximum_filter(mask, footprint=CROSS, mode="nearest")
    ) & (mask != 0)
    coloured = ~((png[..., 0] == png[..., 1]) & (png[..., 1] == png[..., 2]))
    np.testing.assert_array_equal(coloured, edge)  # the outlines, in the nucleus colour, and only there
    assert (png[edge] == (230, 25, 75)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tif", "o.png"]
    capsys.readouterr()
    assert main([*args, "--preview", str(tmp_path / "o.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"unet-tile: error: --preview writes a PNG: give a path ending in .png, got {tmp_path / 'o.jpg'}"]
