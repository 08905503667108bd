from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import tiling
import unet
from service.cli import main
from tests.conftest import balance_classes, make_model

UNET_TILE = str(Path(sys.executable).with_name("unet-tile"))


def run(*args: str | Path) -> int:
    return main(["segment", *map(str, args), "--precision", "fp32", "-q"])  # exact: compared with the engine


def expected_labels(checkpoint: Path, plane_chw: np.ndarray) -> np.ndarray:
    ck = unet.load_checkpoint(checkpoint)
    return tiling.segment(plane_chw, ck.model, normalize=ck.normalization.fit(plane_chw))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_grayscale_of_each_dtype(tmp_path: Path, tiny_checkpoint: Path, dtype: type) -> None:
    data = np.random.default_rng(0).integers(0, 200, (130, 170)).astype(dtype)
    tifffile.imwrite(tmp_path / "in.tif", data, resolution=(5.0, 5.0), resolutionunit="CENTIMETER")
    assert run(tmp_path / "in.tif", "-o", tmp_path / "out.tif", "--checkpoint", tiny_checkpoint) == 0
    with tifffile.TiffFile(tmp_path / "out.tif") as t:
        out = t.asarray()
        assert t.pages[0].compression != tifffile.COMPRESSION.NONE
        assert t.pages[0].get_resolution() == (5.0, 5.0)
        assert t.pages[0].resolutionunit == tifffile.RESUNIT.CENTIMETER
    assert out.shape == (130, 170) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected_labels(tiny_checkpoint, data[None]))


def test_rgb_and_cyx(tmp_path: Path, tiny_rgb_checkpoint: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (90, 120, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "cyx.tif", rgb.transpose(2, 0, 1), photometric="minisblack", metadata={"axes": "CYX"})
    for name in ("rgb", "cyx"):
        assert (
            run(tmp_path / f"{name}.tif", "-o", tmp_path / f"{name}-out.tif", "--checkpoint", tiny_rgb_checkpoint) == 0
        )
    a, b = tifffile.imread(tmp_path / "rgb-out.tif"), tifffile.imread(tmp_path / "cyx-out.tif")
    assert a.shape == (90, 120)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, expected_labels(tiny_rgb_checkpoint, rgb.transpose(2, 0, 1)))


def test_stack_is_segmented_plane_by_plane(tmp_path: Path, tiny_checkpoint: Path) -> None:
    stack = np.random.default_rng(2).integers(0, 4000, (3, 70, 50)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    assert run(tmp_path / "z.tif", "-o", tmp_path / "out.tif", "--checkpoint", tiny_checkpoint) == 0
    with tifffile.TiffFile(tmp_path / "out.tif") as t:
        assert t.series[0].axes == "ZYX"
        out = t.asarray()
    assert out.shape == (3, 70, 50)
    for z in range(3):
        np.testing.assert_array_equal(out[z], expected_labels(tiny_checkpoint, stack[z][None]))


def test_probabilities(tmp_path: Path, tiny_checkpoint: Path) -> None:
    tifffile.imwrite(tmp_path / "in.tif", np.random.default_rng(3).random((60, 61)).astype(np.float32))
    assert (
        run(
            tmp_path / "in.tif",
            "-o",
            tmp_path / "p.tif",
            "--output",
            "probabilities",
            "--checkpoint",
            tiny_checkpoint,
        )
        == 0
    )
    with tifffile.TiffFile(tmp_path / "p.tif") as t:
        assert t.series[0].axes == "CYX"
        p = t.asarray()
    assert p.shape == (2, 60, 61) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    tifffile.imwrite(tmp_path / "labels.tif", p.argmax(0).astype(np.uint8))
    assert run(tmp_path / "in.tif", "-o", tmp_path / "l.tif", "--checkpoint", tiny_checkpoint) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "l.tif"), p.argmax(0))


def balanced_checkpoint(path: Path, image: np.ndarray) -> Path:
    """A random model whose head bias splits ``image`` into both classes about evenly."""
    model = make_model(base_width=4, seed=5)
    norm = unet.Normalization()
    balance_classes(model, torch.from_numpy(norm.fit(image[None])(image[None, None, :572, :572])))
    unet.save_checkpoint(path, model, normalization=norm)
    return path


def test_tile_388_and_900_give_identical_labels(tmp_path: Path) -> None:
    img = np.random.default_rng(4).normal(1000, 200, (900, 900)).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", img)
    ckpt = balanced_checkpoint(tmp_path / "balanced.safetensors", img)
    assert run(tmp_path / "in.tif", "-o", tmp_path / "a.tif", "--tile-size", "388", "--checkpoint", ckpt) == 0
    assert run(tmp_path / "in.tif", "-o", tmp_path / "b.tif", "--tile-size", "900", "--checkpoint", ckpt) == 0
    a, b = tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif")
    assert 0.2 < a.mean() < 0.8  # both classes well present: the comparison is not vacuous
    np.testing.assert_array_equal(a, b)


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, list[str], str]]:
    tifffile.imwrite(tmp / "ok.tif", np.zeros((40, 40), np.uint8))
    tifffile.imwrite(tmp / "rgb.tif", np.zeros((40, 40, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp / "f64.tif", np.zeros((40, 40), np.float64))
    (tmp / "text.tif").write_text("hello")
    (tmp / "trunc.tif").write_bytes((tmp / "ok.tif").read_bytes()[:200])
    (tmp / "bad.safetensors").write_bytes(b"\x00" * 64)
    return {
        "not a tiff": (tmp / "text.tif", [], "not a TIFF file"),
        "truncated": (tmp / "trunc.tif", [], "truncated"),
        "channels": (tmp / "rgb.tif", [], r"model expects 1 channel\(s\), image has 3"),
        "dtype": (tmp / "f64.tif", [], "unsupported pixel type float64; expected one of uint8, uint16, int16, float32"),
        "missing": (tmp / "nope.tif", [], "input file not found"),
        "tile": (tmp / "ok.tif", ["--tile-size", "400"], "output size 400 is not valid .* 388 or 404"),
        "checkpoint": (tmp / "ok.tif", ["--checkpoint", str(tmp / "bad.safetensors")], "corrupt or not a safetensors"),
    }


@pytest.mark.parametrize("case", ["not a tiff", "truncated", "channels", "dtype", "missing", "tile", "checkpoint"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    src, extra, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous result")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [src, "-o", out, *(extra if "--checkpoint" in extra else ["--checkpoint", tiny_checkpoint, *extra])]
    assert run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unet-tile: error: ")
    assert __import__("re").search(message, err[0]), err[0]
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_console_script(tmp_path: Path, tiny_checkpoint: Path) -> None:
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((50, 50), np.uint8))
    ok = subprocess.run(
        [UNET_TILE, "segment", tmp_path / "in.tif", "-o", tmp_path / "o.tif", "--checkpoint", tiny_checkpoint],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "tile" in ok.stderr  # the progress bar
    assert tifffile.imread(tmp_path / "o.tif").shape == (50, 50)
    bad = subprocess.run(
        [UNET_TILE, "segment", tmp_path / "o.tif", "-o", tmp_path / "o.tif"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "output path must differ" in bad.stderr
    (tmp_path / "text.tif").write_text("hello")
    refused = subprocess.run(  # without -q too: a refused input is one line, no empty progress bar before it
        [UNET_TILE, "segment", tmp_path / "text.tif", "-o", tmp_path / "t.tif", "--checkpoint", tiny_checkpoint],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "unet-tile: error: not a TIFF file (starts with b'hell'); expected a TIFF image (II*/MM* header)"
    ]
    usage = subprocess.run([UNET_TILE, "segment"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and usage.stderr == "unet-tile: error: give an input image, several, or --dir DIR\n"
