"""One pipeline, every source x every sink: the same labels as the in-memory fp32 path.

Sources: a TIFF decoded whole, a TIFF read window by window, OME-Zarr 0.4 (Zarr v2) and 0.5
(Zarr v3). Sinks: the in-memory array, a tiled BigTIFF, a pyramidal OME-TIFF, OME-Zarr
labels. The reference is the engine alone (:func:`tiling.segment`) on the decoded plane with
the checkpoint's normalization, fitted once per plane.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

import tiling
import unet
from service.cli import main
from service.errors import InputError
from service.instances import fill_holes, instance_rule
from service.pipeline import Options, choose_route, open_input, segment, segment_file
from service.segmenter import Segmenter
from service.sinks import MemorySink, PyramidTiffSink, TiledTiffSink
from service.sources import Source, TiffSource
from tests.conftest import balance_classes

ome_zarr = pytest.importorskip("ome_zarr", reason="OME-Zarr needs the ome-zarr extra")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Label, Reader  # noqa: E402
from ome_zarr.writer import write_image  # noqa: E402

from service.omezarr import OmeZarrSink, OmeZarrSource  # noqa: E402

SHAPE = (300, 430)
TILE = 100  # several tiles each way, so tile borders and the last partial row/column are crossed


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    a = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 3)
    return ((a - a.min()) / (a.max() - a.min()) * 4000).astype(np.uint16)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    torch.manual_seed(5)
    model = unet.UNet(unet.UNetConfig(in_channels=1, depth=2, base_width=4)).eval()
    balance_classes(model, torch.from_numpy(blobs((1, 1, 160, 160), seed=9).astype(np.float32) / 4000))
    path = tmp_path_factory.mktemp("ck") / "ck.safetensors"
    unet.save_checkpoint(path, model, class_names=["background", "nucleus"])
    return Segmenter(unet.load_checkpoint(path), device="cpu", precision="fp32", batch_size=3)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 2-D image as a tiled TIFF and as OME-Zarr 0.4 and 0.5 (with a physical scale)."""
    root = tmp_path_factory.mktemp("inputs")
    image = blobs(SHAPE)
    tifffile.imwrite(
        root / "in.tif",
        image,
        tile=(64, 64),
        compression="zlib",
        resolution=(5000.0, 5000.0),
        resolutionunit="CENTIMETER",
    )
    for version, fmt in (("0.4", FormatV04()), ("0.5", FormatV05())):
        path = root / f"in-{version}.ome.zarr"
        write_image(
            image,
            str(path),
            fmt=fmt,
            axes=["y", "x"],
            scale={"y": 2.0, "x": 2.0},
            axes_units={"y": "micrometer", "x": "micrometer"},
            scale_factors=[2],  # two levels
            storage_options={"chunks": (64, 64)},
        )
    np.save(root / "image.npy", image)
    return {
        "tiff": root / "in.tif",
        "0.4": root / "in-0.4.ome.zarr",
        "0.5": root / "in-0.5.ome.zarr",
        "npy": root / "image.npy",
    }


@pytest.fixture(scope="module")
def reference(segmenter: Segmenter, inputs: dict[str, Path]) -> np.ndarray[Any, Any]:
    """The engine alone on the decoded image: what every path must give."""
    plane = np.load(inputs["npy"])[None]
    affine = segmenter.checkpoint.normalization.fit(plane)
    labels: np.ndarray[Any, Any] = tiling.segment(
        plane, segmenter.checkpoint.model, tile_size=TILE, normalize=affine, precision="fp32", device="cpu"
    )
    assert 0.1 < labels.mean() < 0.9, "the test model should give both classes"
    return labels


@pytest.fixture(scope="module")
def filled(segmenter: Segmenter, reference: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The reference with its holes filled: what the CLI writes by default (``--keep-holes`` off)."""
    return fill_holes(reference, instance_rule(segmenter.checkpoint))


@contextlib.contextmanager
def open_source(kind: str, inputs: dict[str, Path]) -> Iterator[Source]:
    if kind == "tiff-decoded":
        with TiffSource(inputs["tiff"]) as t:
            yield t.decoded()
    elif kind == "tiff-windowed":
        with TiffSource(inputs["tiff"]) as t:
            yield t.windowed()
    else:
        with OmeZarrSource(inputs[kind.removeprefix("ome-zarr-")]) as z:
            yield z


def read_back(kind: str, path: Path, sink: Any, levels: int = 1) -> np.ndarray[Any, Any]:
    if kind == "array":
        return np.asarray(sink.result[0])
    if kind == "tiled-tiff":
        with tifffile.TiffFile(path) as t:
            assert t.is_bigtiff and t.pages.first.is_tiled
            return t.asarray()
    if kind == "pyramid-tiff":
        with tifffile.TiffFile(path) as t:
            assert t.is_ome
            levels = [lv.asarray() for lv in t.series[0].levels]
        for k, level in enumerate(levels[1:], 1):
            np.testing.assert_array_equal(level, levels[0][:: 2**k, :: 2**k])
        return levels[0]
    return read_labels(path, "unet", levels)


def read_labels(store: Path, name: str, levels: int) -> np.ndarray[Any, Any]:
    """``labels/<name>`` of an OME-Zarr store, read with ome-zarr-py's own reader; checks its pyramid."""
    location = parse_url(str(store))
    assert location is not None
    found = [n for n in Reader(location)() if n.first(Label) is not None and n.zarr.basename() == name]
    assert len(found) == 1, "the labels are found by the reader"
    node = found[0]
    assert node.metadata["name"] == name or node.zarr.basename() == name
    labels: np.ndarray[Any, Any] = np.asarray(node.data[0])
    assert (
        len(node.data) == levels
    )  # as many as the image: the OME-Zarr inputs have 2; the TIFF halves once to fit a 256 chunk
    for k, level in enumerate(node.data[1:], 1):
        np.testing.assert_array_equal(np.asarray(level), labels[:: 2**k, :: 2**k])
    return labels


SOURCES = ["tiff-decoded", "tiff-windowed", "ome-zarr-0.4", "ome-zarr-0.5"]
SINKS = ["array", "tiled-tiff", "pyramid-tiff", "ome-zarr"]


@pytest.mark.parametrize("sink_kind", SINKS)
@pytest.mark.parametrize("source_kind", SOURCES)
def test_every_source_into_every_sink_gives_the_in_memory_labels(
    segmenter: Segmenter,
    inputs: dict[str, Path],
    reference: np.ndarray[Any, Any],
    tmp_path: Path,
    source_kind: str,
    sink_kind: str,
) -> None:
    options = Options(tile_size=TILE)
    out = (
        tmp_path
        / {"array": "x", "tiled-tiff": "out.tif", "pyramid-tiff": "out.ome.tif", "ome-zarr": "out.ome.zarr"}[sink_kind]
    )
    with open_source(source_kind, inputs) as source:
        header = source.header
        assert (header.height, header.width) == SHAPE
        makers: dict[str, Callable[[], Any]] = {
            "array": lambda: MemorySink(header, "labels", 2),
            "tiled-tiff": lambda: TiledTiffSink(out, header),
            "pyramid-tiff": lambda: PyramidTiffSink(out, header),
            "ome-zarr": lambda: OmeZarrSink(out, header, class_names=["background", "nucleus"], image=source),
        }
        sink = makers[sink_kind]()
        ticks: list[int] = []
        segment(segmenter, source, sink, options, ticks.append)
    assert sum(ticks) == 3 * 5
    np.testing.assert_array_equal(read_back(sink_kind, out, sink, 2), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        [] if sink_kind == "array" else [out.name]
    )  # no temporary left


@pytest.mark.parametrize("source_kind", SOURCES)
def test_a_failure_mid_run_leaves_no_output_on_any_sink(
    segmenter: Segmenter, inputs: dict[str, Path], tmp_path: Path, source_kind: str
) -> None:
    for name in ("out.tif", "out.ome.tif", "out.ome.zarr"):
        with open_source(source_kind, inputs) as source:
            header, target = source.header, tmp_path / name
            if name == "out.tif":
                sink: Any = TiledTiffSink(target, header)
            elif name == "out.ome.tif":
                sink = PyramidTiffSink(target, header)
            else:
                sink = OmeZarrSink(target, header, class_names=["a", "b"], image=source)
            done = 0

            def stop_half_way(n: int) -> None:
                nonlocal done
                done += n
                if done == 8:
                    raise KeyboardInterrupt

            with pytest.raises(KeyboardInterrupt):
                segment(segmenter, source, sink, Options(tile_size=TILE), stop_half_way)
        assert list(tmp_path.iterdir()) == []


def test_the_route_is_decided_once_from_the_header(inputs: dict[str, Path]) -> None:
    with contextlib.closing(open_input(inputs["tiff"])) as tiff:
        header = tiff.header
    assert choose_route(header, Options()).write == "memory"  # 258 kB: decoded, in memory
    assert choose_route(header, Options(), stream_above_mb=0.1).streamed
    assert choose_route(header, Options(pyramid=True)).write == "pyramid-tiff"
    assert choose_route(header, Options(), zarr_out=True).write == "ome-zarr"
    assert choose_route(header, Options(), zarr_in=True).read == "windowed"  # an OME-Zarr is never read whole
    with pytest.raises(InputError, match="OME-Zarr labels hold ids"):
        choose_route(header, Options(output="probabilities"), zarr_out=True)


@pytest.mark.parametrize(
    ("src", "dst"),
    [("tiff", "out.ome.zarr"), ("0.4", "out.tif"), ("0.5", "out.ome.zarr"), ("0.4", "out.ome.tif")],
    ids=["tif-to-zarr", "zarr04-to-tif", "zarr05-to-zarr", "zarr-to-pyramid"],
)
def test_cli_mixes_tiff_and_ome_zarr(
    segmenter: Segmenter,
    inputs: dict[str, Path],
    filled: np.ndarray[Any, Any],
    tmp_path: Path,
    src: str,
    dst: str,
    checkpoint_file: Path,
) -> None:
    out = tmp_path / dst
    extra = ["--pyramid"] if dst.endswith(".ome.tif") else []
    argv = ["segment", str(inputs[src]), "-o", str(out), "--tile-size", str(TILE), "--checkpoint", str(checkpoint_file)]
    assert main([*argv, "--precision", "fp32", "--device", "cpu", "-q", *extra]) == 0
    kind = "ome-zarr" if dst.endswith(".zarr") else "pyramid-tiff" if extra else "tiled-tiff"
    if kind == "tiled-tiff":  # an OME-Zarr input streams: a tiled BigTIFF
        with tifffile.TiffFile(out) as t:
            assert t.pages.first.is_tiled
            got = t.asarray()
            assert t.pages.first.get_resolution() == pytest.approx((5000.0, 5000.0))  # 2 µm in both inputs
    else:
        got = read_back(kind, out, None, 2)
    np.testing.assert_array_equal(got, filled)


@pytest.fixture(scope="module")
def checkpoint_file(segmenter: Segmenter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ck2") / "ck.safetensors"
    unet.save_checkpoint(path, segmenter.checkpoint.model, class_names=list(segmenter.checkpoint.class_names))
    return path


def test_labels_go_into_the_input_store_with_a_flag(
    inputs: dict[str, Path],
    filled: np.ndarray[Any, Any],
    tmp_path: Path,
    checkpoint_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil

    store = tmp_path / "copy.ome.zarr"
    shutil.copytree(inputs["0.5"], store)
    argv = ["segment", str(store), "--into-input", "--tile-size", str(TILE), "--checkpoint", str(checkpoint_file)]
    assert main([*argv, "--precision", "fp32", "--device", "cpu", "-q", "--label-name", "cells"]) == 0
    np.testing.assert_array_equal(read_labels(store, "cells", 2), filled)
    assert main([*argv, "--precision", "fp32", "--device", "cpu", "-q", "--label-name", "cells"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main(["segment", str(inputs["tiff"]), "--into-input", "-q", "--checkpoint", str(checkpoint_file)]) == 2
    assert main(["segment", str(store), "-q", "--checkpoint", str(checkpoint_file)]) == 2  # neither -o nor --into-input


def test_segment_file_refuses_bad_targets_before_any_work(
    segmenter: Segmenter, inputs: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="output directory does not exist"):
        segment_file(segmenter, inputs["tiff"], tmp_path / "nope" / "out.tif")
    with pytest.raises(InputError, match="must differ"):
        segment_file(segmenter, inputs["tiff"], inputs["tiff"])
    with pytest.raises(InputError, match="not found"):
        segment_file(segmenter, tmp_path / "missing.tif", tmp_path / "out.tif")
