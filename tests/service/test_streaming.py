"""Streamed segmentation: windowed reads in, band-by-band tiled BigTIFF out, same labels."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

import unet
from service.cli import main
from service.errors import CorruptImageError, UnsupportedImageError
from service.pipeline import Options, count_tiles, segment_file, segment_image
from service.segmenter import Segmenter
from service.sinks import OUTPUT_TILE
from service.sources import TiffSource, read_image
from tests.conftest import balance_classes


def smooth_image(shape: tuple[int, ...], seed: int = 0, dtype: type = np.uint16) -> np.ndarray:
    """Blobby test content, so a random network gives labels of both classes."""
    a = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 3)
    a = (a - a.min()) / (a.max() - a.min())
    return (a * (250 if dtype == np.uint8 else 4000)).astype(dtype)


def balanced_checkpoint(
    path: Path, *, in_channels: int = 1, depth: int = 2, normalization: unet.Normalization | None = None
) -> Path:
    """A random small U-Net whose head bias splits a smooth image into two classes."""
    torch.manual_seed(in_channels * 10 + depth)
    model = unet.UNet(unet.UNetConfig(in_channels=in_channels, depth=depth, base_width=4)).eval()
    x = torch.from_numpy(smooth_image((in_channels, 160, 160), seed=99).astype(np.float32) / 4000.0)
    balance_classes(model, x[None])
    unet.save_checkpoint(path, model, normalization=normalization)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return balanced_checkpoint(tmp_path_factory.mktemp("ck") / "gray.safetensors")


@pytest.fixture(scope="module")
def segmenter(checkpoint: Path) -> Segmenter:
    return Segmenter(unet.load_checkpoint(checkpoint), device="cpu", batch_size=2)


def in_memory(segmenter: Segmenter, path: Path, tile_size: int = 100) -> np.ndarray:
    return segment_image(segmenter, read_image(path), Options(tile_size=tile_size))


def streamed(segmenter: Segmenter, src: Path, dst: Path, tile_size: int = 100, **kw: object) -> None:
    """The streamed path, whatever the image's size."""
    report = segment_file(segmenter, src, dst, Options(tile_size=tile_size, **kw), stream_above_mb=0)  # type: ignore[arg-type]
    assert report.route.streamed


@pytest.mark.parametrize(
    "layout",
    [
        {"tile": (64, 64), "compression": "zlib"},
        {"rowsperstrip": 16, "compression": "zlib"},
        {},  # uncompressed, contiguous: read through a memory map
    ],
    ids=["tiled", "striped", "contiguous"],
)
def test_streamed_equals_in_memory(tmp_path: Path, segmenter: Segmenter, layout: dict[str, object]) -> None:
    image = smooth_image((300, 470))
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, image, resolution=(4.0, 4.0), resolutionunit="CENTIMETER", **layout)  # type: ignore[arg-type]
    ticks: list[int] = []
    report = segment_file(
        segmenter, src, tmp_path / "out.tif", Options(tile_size=100), stream_above_mb=0, progress=ticks.append
    )
    assert report.route.streamed
    expected = in_memory(segmenter, src)[0]
    assert 0.1 < expected.mean() < 0.9, "test model should give both classes"
    with tifffile.TiffFile(tmp_path / "out.tif") as t:
        page = t.pages[0]
        assert t.is_bigtiff and page.is_tiled
        assert (page.tilelength, page.tilewidth) == (OUTPUT_TILE, OUTPUT_TILE)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.get_resolution() == (4.0, 4.0)
        out = t.asarray()
    assert out.shape == (300, 470) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert sum(ticks) == count_tiles(segmenter, read_image(src).header, Options(tile_size=100)) == report.tiles


def test_rgb_and_stack_stream_like_in_memory(tmp_path: Path, segmenter: Segmenter) -> None:
    rgb_ck = Segmenter(unet.load_checkpoint(balanced_checkpoint(tmp_path / "rgb.safetensors", in_channels=3)))
    rgb = smooth_image((150, 270, 3), seed=1, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", tile=(32, 32))
    streamed(rgb_ck, tmp_path / "rgb.tif", tmp_path / "rgb-out.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "rgb-out.tif"), in_memory(rgb_ck, tmp_path / "rgb.tif")[0])

    stack = smooth_image((3, 120, 90), seed=2)
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"}, tile=(32, 32), photometric="minisblack")
    streamed(segmenter, tmp_path / "z.tif", tmp_path / "z-out.tif")
    with tifffile.TiffFile(tmp_path / "z-out.tif") as t:
        assert t.series[0].axes == "ZYX"
        out = t.asarray()
    np.testing.assert_array_equal(out, in_memory(segmenter, tmp_path / "z.tif"))


def test_pyramid_is_an_ome_tiff_with_nearest_levels(tmp_path: Path, segmenter: Segmenter) -> None:
    image = smooth_image((600, 700), seed=3)
    tifffile.imwrite(
        tmp_path / "in.tif", image, tile=(128, 128), resolution=(20000.0, 20000.0), resolutionunit="CENTIMETER"
    )
    streamed(segmenter, tmp_path / "in.tif", tmp_path / "out.ome.tif", tile_size=196, pyramid=True)
    expected = in_memory(segmenter, tmp_path / "in.tif", tile_size=196)[0]
    with tifffile.TiffFile(tmp_path / "out.ome.tif") as t:
        assert t.is_ome and t.is_bigtiff
        levels = t.series[0].levels
        assert [lv.shape for lv in levels] == [(600, 700), (300, 350), (150, 175)]
        for k, lv in enumerate(levels):
            assert lv.keyframe.is_tiled
            np.testing.assert_array_equal(lv.asarray(), expected[:: 2**k, :: 2**k])
        assert 'PhysicalSizeX="0.5"' in (t.ome_metadata or "")
        assert 'PhysicalSizeXUnit="µm"' in (t.ome_metadata or "")


def test_cli_threshold_picks_the_path_and_both_agree(tmp_path: Path, checkpoint: Path) -> None:
    image = smooth_image((260, 300), seed=4)
    tifffile.imwrite(tmp_path / "in.tif", image)  # 156 kB decoded
    common = ["segment", str(tmp_path / "in.tif"), "--checkpoint", str(checkpoint), "--tile-size", "100"]
    common += ["--precision", "fp32", "-q"]
    assert main([*common, "-o", str(tmp_path / "mem.tif"), "--stream-above", "1"]) == 0
    assert main([*common, "-o", str(tmp_path / "str.tif"), "--stream-above", "0.1"]) == 0
    with tifffile.TiffFile(tmp_path / "mem.tif") as mem, tifffile.TiffFile(tmp_path / "str.tif") as streamed:
        assert not mem.pages.first.is_tiled  # small input: the in-memory path, striped output
        assert streamed.pages.first.is_tiled
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mem.tif"), tifffile.imread(tmp_path / "str.tif"))


def test_cli_pyramid_for_probabilities_is_refused(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tifffile.imwrite(tmp_path / "in.tif", smooth_image((40, 40)))
    out = tmp_path / "out.tif"
    args = ["segment", str(tmp_path / "in.tif"), "-o", str(out), "--checkpoint", str(checkpoint), "-q"]
    assert main([*args, "--pyramid", "--output", "probabilities"]) == 2
    assert "--pyramid applies to labels" in capsys.readouterr().err
    assert not out.exists()


def test_failure_mid_stream_leaves_no_output(tmp_path: Path, segmenter: Segmenter) -> None:
    tifffile.imwrite(tmp_path / "in.tif", smooth_image((300, 300)), tile=(64, 64))

    def cancel(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_file(
            segmenter,
            tmp_path / "in.tif",
            tmp_path / "out.tif",
            Options(tile_size=100),
            stream_above_mb=0,
            progress=cancel,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_truncated_and_huge_strip_files_are_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "in.tif", smooth_image((200, 200)), tile=(64, 64), compression="zlib")
    data = (tmp_path / "in.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptImageError, match="truncated"):
        TiffSource(tmp_path / "cut.tif")
    big = np.zeros((9000, 8000), np.uint8)  # one 72 MB compressed strip
    tifffile.imwrite(tmp_path / "strip.tif", big, compression="zlib", rowsperstrip=9000)
    with pytest.raises(UnsupportedImageError, match="tiled or striped"), TiffSource(tmp_path / "strip.tif") as source:
        source.windowed()


# The child warms up on a small image (torch, thread pools and tile buffers at their steady
# state); then, for each path, it resets its peak-RSS mark (VmHWM, via /proc/self/clear_refs)
# and segments the big image: the growth of the peak over the RSS just before is what the
# big image costs on that path.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from service.cli import main

    def status(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    ck, small, big, out_dir = sys.argv[1:5]
    common = ["--checkpoint", ck, "--tile-size", "388", "--batch-size", "1", "-q"]
    for stream_above in ("0", "1e9"):  # warm both paths (imports, buffers)
        assert main(["segment", small, "-o", out_dir + "/warm.tif", *common, "--stream-above", stream_above]) == 0
    growth = {}
    for name, stream_above in (("streamed", "0"), ("in_memory", "1e9")):
        base = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        assert main(["segment", big, "-o", f"{out_dir}/{name}.tif", *common, "--stream-above", stream_above]) == 0
        growth[name] = (status("VmHWM:") - base) / 1024
    print(json.dumps(growth))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_image_larger_than_the_memory_limit_streams_within_it(tmp_path: Path) -> None:
    # 4 float32 channels, 2304 x 2304: 85 MB decoded. Fixed normalization, so memory is
    # about the image, not the percentile sample. The limit for the run: 40 MB above the warm baseline.
    norm = unet.Normalization(method="fixed", mean=(0.5,) * 4, std=(0.25,) * 4)
    ck = balanced_checkpoint(tmp_path / "ck4.safetensors", in_channels=4, depth=1, normalization=norm)
    yy, xx = np.ogrid[:2304, :2304]
    wave = ((np.sin(yy / 37.0) * np.cos(xx / 53.0) + 1) / 2).astype(np.float32)
    image = np.stack([wave, wave**2, 1 - wave, np.sqrt(wave)])
    limit_mb = 40.0
    assert image.nbytes / 2**20 > 2 * limit_mb
    tifffile.imwrite(
        tmp_path / "big.tif",
        image,
        metadata={"axes": "CYX"},
        photometric="minisblack",
        tile=(256, 256),
        compression="zlib",
    )
    tifffile.imwrite(
        tmp_path / "small.tif",
        image[:, :800, :800],
        metadata={"axes": "CYX"},
        photometric="minisblack",
        tile=(256, 256),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ck), str(tmp_path / "small.tif"), str(tmp_path / "big.tif"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    streamed, in_memory_ = growth["streamed"], growth["in_memory"]
    assert streamed < limit_mb, f"streamed run grew by {streamed:.0f} MB"
    assert in_memory_ > limit_mb, f"in-memory run grew by only {in_memory_:.0f} MB: the limit would not bite"
    out_s, out_m = tifffile.imread(tmp_path / "streamed.tif"), tifffile.imread(tmp_path / "in_memory.tif")
    assert out_s.shape == (2304, 2304)
    assert 0.02 < out_s.mean() < 0.98
    np.testing.assert_array_equal(out_s, out_m)
