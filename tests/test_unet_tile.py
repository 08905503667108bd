"""``unet_tile``: one call, the checkpoint's own preprocessing, the CLI's mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

import unet_tile
from service.cli import main
from service.errors import InputError


@pytest.fixture(scope="module")
def model() -> unet_tile.Model:
    return unet_tile.load("demo", precision="fp32")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    from unet.synth import synth_image

    return synth_image(np.random.default_rng(4), (400, 520), dtype="uint16").image


@pytest.mark.parametrize("kind", ["labels", "instances", "probabilities"])
def test_segment_gives_what_the_cli_writes(
    model: unet_tile.Model, image: np.ndarray, tmp_path: Path, kind: str
) -> None:
    tifffile.imwrite(tmp_path / "in.tif", image)
    out = tmp_path / "out.tif"
    assert main(["segment", str(tmp_path / "in.tif"), "-o", str(out), "--kind", kind, "--precision", "fp32", "-q"]) == 0
    got = model.segment(image, output=kind)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, tifffile.imread(out))
    if kind == "labels":
        assert (got > 0).mean() > 0.05  # nuclei found: the normalization was applied


def test_stacks_array_likes_and_axes(model: unet_tile.Model, image: np.ndarray, tmp_path: Path) -> None:
    one = model.segment(image)
    stack = np.stack([image, image[::-1]])
    both = model.segment(stack)  # 3-D with one channel: a Z stack
    assert both.shape == (2, *image.shape)
    np.testing.assert_array_equal(both[0], one)
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=image.shape, chunks=(128, 128), dtype=image.dtype)
    z[:] = image
    np.testing.assert_array_equal(model.segment(z), one)  # read window by window
    with pytest.raises(InputError, match="cannot tell the axes of an array of shape"):
        model.segment(np.zeros((2, 3, 40, 40), np.uint16))
    assert model.class_names == ["background", "nucleus", "boundary"]
