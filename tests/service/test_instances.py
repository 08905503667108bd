"""``output=instances`` through the pipeline: the same ids on every route, the table, the shapes.

Constructed cases go through a segmenter whose "network" reads the class straight off the
input's first channel (an identity that crops the margin), so a mask drawn here is exactly
the class mask the instance sink sees; the second channel is an intensity to measure.
"""

from __future__ import annotations

import csv
import errno
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import unet
from service.errors import InputError
from service.instances import instance_rule
from service.pipeline import Options, segment_file, segment_image
from service.segmenter import Segmenter
from service.sources import read_image
from tests.conftest import make_model
from tests.tiling.test_instances import random_mask
from tiling import CallablePredictor
from tiling.instances import InstanceRule, label_instances

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape as geometry  # noqa: E402

MIN_AREA = 5
RULE = InstanceRule(seeds=(1,), grow=(2,), min_area=MIN_AREA)


@pytest.fixture(scope="module")
def identity_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("identity") / "identity.safetensors"
    unet.save_checkpoint(
        path,
        make_model(in_channels=2, num_classes=3),
        normalization=unet.Normalization("fixed", mean=(0.0, 0.0), std=(1.0, 1.0)),
        class_names=["background", "nucleus", "boundary"],
        foreground=[1, 2],
        instances=RULE.to_dict(),
    )
    return path


def class_of_channel_0(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    m = 92  # depth 4: the valid convolutions' margin
    cls = np.rint(x[:, 0, m:-m, m:-m]).astype(np.int64)
    return (np.arange(3)[None, :, None, None] == cls[:, None]).astype(np.float32)


@pytest.fixture(scope="module")
def identity(identity_checkpoint: Path) -> Segmenter:
    seg = Segmenter(unet.load_checkpoint(identity_checkpoint), device="cpu")
    seg.predictor = CallablePredictor(class_of_channel_0, depth=4)  # type: ignore[assignment]
    return seg


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray[Any, Any]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def constructed(shape: tuple[int, int] = (1000, 700), seed: int = 0) -> np.ndarray[Any, Any]:
    """Class mask: nuclei over the band seams (rows 386 and 770 for 388-px tiles) and tile
    borders, a long diagonal object over every band, touching pairs with a boundary line,
    a nucleus with a hole, fragments, boundary specks out of reach, random blobs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    for cy, cx, r in [(386, 200, 30), (770, 386, 25), (385, 385, 12), (100, 60, 20)]:
        mask[disc(shape, cy, cx, r)] = 1
    rows = np.arange(0, shape[0] - 10)
    for d in range(-2, 3):  # a 5-px wide diagonal from the top to the bottom
        mask[rows, diagonal_cols(rows, shape) + d] = 1
    a, b = disc(shape, 600, 150, 18), disc(shape, 600, 183, 18)  # touching pair, boundary between them
    mask[a | b] = 1
    xx = np.arange(shape[1])[None, :]
    mask[(a | b) & (np.abs(xx - 166.5) < 1.5)] = 2
    ring = disc(shape, 250, 600, 22)
    mask[ring] = 1
    mask[disc(shape, 250, 600, 6)] = 0  # a hole
    mask[900:902, 50:52] = 1  # a fragment under MIN_AREA
    mask[50, 300] = mask[951, 20] = 2  # boundary specks, no nucleus near
    blobs = ndimage.gaussian_filter(rng.random(shape), 3) > 0.53
    mask[blobs & ~ndimage.binary_dilation(mask > 0, iterations=4)] = 1  # apart from the objects above
    return mask


def diagonal_cols(rows: np.ndarray[Any, Any], shape: tuple[int, int]) -> np.ndarray[Any, Any]:
    return 60 + rows * (shape[1] - 140) // shape[0]


def write_input(path: Path, mask: np.ndarray[Any, Any], seed: int = 1) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    intensity = (rng.random(mask.shape) * 1000 + mask.astype(np.float64) * 500).astype(np.uint16)
    image = np.stack([mask.astype(np.uint16), intensity])
    tifffile.imwrite(path, image, photometric="minisblack", metadata={"axes": "CYX"}, resolution=(2.0, 2.0))
    return image


def read_labels(path: Path) -> np.ndarray[Any, Any]:
    if path.suffix == ".zarr":  # read back by ome-zarr-py's own reader
        from tests.service.cluster_helpers import read_back

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, labels = read_back(path)
            return np.asarray(labels.data[0])
    return tifffile.imread(path)


ROUTES = [
    pytest.param("out.tif", {}, 1e9, id="in-memory-388"),
    pytest.param("out.tif", {"tile_size": 900}, 1e9, id="in-memory-900"),
    pytest.param("out.tif", {}, 0, id="streamed-388"),
    pytest.param("out.tif", {"tile_size": 900}, 0, id="streamed-900"),
    pytest.param("out.ome.tif", {"pyramid": True}, 0, id="pyramid"),
    pytest.param("out.ome.zarr", {}, 0, id="ome-zarr"),
]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    d = tmp_path_factory.mktemp("instances-case")
    mask = constructed()
    image = write_input(d / "in.tif", mask)
    return d / "in.tif", mask, image


@pytest.mark.parametrize(("name", "extra", "stream_above"), ROUTES)
def test_every_route_gives_the_whole_mask_ids(
    tmp_path: Path,
    identity: Segmenter,
    case: tuple[Path, np.ndarray[Any, Any], np.ndarray[Any, Any]],
    name: str,
    extra: dict[str, Any],
    stream_above: float,
) -> None:
    if name.endswith(".zarr"):
        pytest.importorskip("ome_zarr")
    src, mask, image = case
    want = label_instances(mask, RULE)
    out = tmp_path / name
    options = Options(output="instances", table=tmp_path / "t.csv", geojson=tmp_path / "s.geojson", **extra)
    report = segment_file(identity, src, out, options, stream_above_mb=stream_above)
    assert report.route.streamed == (stream_above == 0)
    got = read_labels(out)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)
    assert report.objects == int(want.max())
    # the constructed objects are whole and apart
    assert len(np.unique(got[disc(mask.shape, 386, 200, 29)])) == 1  # over the first seam
    rows = np.arange(0, mask.shape[0] - 10)
    diagonal = got[rows, diagonal_cols(rows, mask.shape)]
    assert len(set(diagonal.tolist())) == 1 and diagonal[0] > 0  # one object over every band
    left, right = got[600, 150], got[600, 183]
    assert left > 0 and right > 0 and left != right  # the touching pair, separated
    assert got[250, 600] == got[250, 580] > 0  # the hole filled
    assert got[900, 50] == 0 and got[50, 300] == 0  # fragment dropped, speck out of reach
    # the table and the shapes are the same on every route
    assert_table_matches(tmp_path / "t.csv", got, image, pixel_um2=(25400 / 2.0) ** 2 / 1e0)
    assert_shapes_match(tmp_path / "s.geojson", got)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "t.csv", "s.geojson"])  # no spool left


def table_of(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def assert_table_matches(path: Path, ids: np.ndarray[Any, Any], image: np.ndarray[Any, Any], pixel_um2: float) -> None:
    t = table_of(path)
    n = int(ids.max())
    index = np.arange(1, n + 1)
    np.testing.assert_array_equal(t["id"], index)
    area = ndimage.sum_labels(np.ones_like(ids), ids, index)
    np.testing.assert_array_equal(t["area_px"], area)
    np.testing.assert_allclose(t["area_um2"], area * pixel_um2, rtol=1e-5)
    cy, cx = np.array(ndimage.center_of_mass(np.ones_like(ids), ids, index)).T
    np.testing.assert_allclose(t["centroid_y"], cy, rtol=1e-5)
    np.testing.assert_allclose(t["centroid_x"], cx, rtol=1e-5)
    boxes = ndimage.find_objects(ids)
    np.testing.assert_array_equal(t["bbox_y0"], [b[0].start for b in boxes])
    np.testing.assert_array_equal(t["bbox_x1"], [b[1].stop for b in boxes])
    for c in range(image.shape[0]):
        ch = image[c].astype(np.float64)
        np.testing.assert_allclose(t[f"mean_intensity_c{c}"], ndimage.mean(ch, ids, index), rtol=1e-5)
        np.testing.assert_allclose(t[f"max_intensity_c{c}"], ndimage.maximum(ch, ids, index), rtol=1e-5)
        np.testing.assert_allclose(t[f"integrated_intensity_c{c}"], ndimage.sum_labels(ch, ids, index), rtol=1e-5)


def assert_shapes_match(path: Path, ids: np.ndarray[Any, Any]) -> None:
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == int(ids.max())
    areas = np.bincount(ids.ravel())
    for f in features:
        props = f["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"
        obj = int(props["name"])
        geom = geometry(f["geometry"])
        assert geom.is_valid, obj
        if areas[obj] >= 50:
            assert abs(geom.area - areas[obj]) <= 0.02 * areas[obj]
        box = ndimage.find_objects((ids == obj).astype(np.int32))[0]
        minx, miny, maxx, maxy = geom.bounds  # full-resolution pixel coordinates
        assert (miny, minx, maxy, maxx) == (box[0].start, box[1].start, box[0].stop, box[1].stop)


def test_the_python_api_and_a_stack(tmp_path: Path, identity: Segmenter) -> None:
    masks = np.stack([random_mask(np.random.default_rng(s), (300, 400)) for s in (3, 4)])
    rng = np.random.default_rng(0)
    image = np.stack([masks.astype(np.uint16), rng.integers(0, 100, masks.shape, dtype=np.uint16)], axis=1)
    tifffile.imwrite(tmp_path / "zc.tif", image, photometric="minisblack", metadata={"axes": "ZCYX"})
    got = segment_image(
        identity, read_image(tmp_path / "zc.tif"), Options(output="instances", table=tmp_path / "t.csv")
    )
    assert got.shape == (2, 300, 400) and got.dtype == np.uint32
    for z in range(2):
        np.testing.assert_array_equal(got[z], label_instances(masks[z], RULE))  # ids restart per plane
    t = table_of(tmp_path / "t.csv")
    assert t["plane"].tolist() == [0] * int(got[0].max()) + [1] * int(got[1].max())


def test_min_area_is_the_checkpoints_unless_asked(tmp_path: Path, identity: Segmenter) -> None:
    assert instance_rule(identity.checkpoint) == RULE
    assert instance_rule(identity.checkpoint, 0).min_area == 0
    with pytest.raises(InputError, match="min area"):
        instance_rule(identity.checkpoint, -1)
    mask = np.zeros((200, 200), np.uint8)
    mask[10:12, 10:12] = 1  # 4 px: under the checkpoint's 5
    mask[50:60, 50:60] = 1
    write_input(tmp_path / "in.tif", mask)
    for min_area, n in ((None, 1), (0, 2), (101, 0)):
        report = segment_file(
            identity, tmp_path / "in.tif", tmp_path / "o.tif", Options(output="instances", min_area=min_area)
        )
        assert report.objects == n
        assert int(tifffile.imread(tmp_path / "o.tif").max()) == n


def test_a_table_without_instances_is_refused(tmp_path: Path, identity: Segmenter) -> None:
    write_input(tmp_path / "in.tif", random_mask(np.random.default_rng(0), (100, 100)))
    with pytest.raises(InputError, match="instances"):
        segment_file(identity, tmp_path / "in.tif", tmp_path / "o.tif", Options(table=tmp_path / "t.csv"))
    with pytest.raises(InputError, match="directory"):
        segment_file(
            identity,
            tmp_path / "in.tif",
            tmp_path / "o.tif",
            Options(output="instances", table=tmp_path / "no" / "t.csv"),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


@pytest.mark.parametrize("stream_above", [1e9, 0], ids=["in-memory", "streamed"])
def test_a_failure_midway_leaves_nothing(tmp_path: Path, identity: Segmenter, stream_above: float) -> None:
    write_input(tmp_path / "in.tif", constructed())
    options = Options(output="instances", table=tmp_path / "t.csv", geojson=tmp_path / "s.geojson")
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 4:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        segment_file(
            identity, tmp_path / "in.tif", tmp_path / "o.tif", options, stream_above_mb=stream_above, progress=progress
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_parquet_table_when_pyarrow_is_there(tmp_path: Path, identity: Segmenter) -> None:
    write_input(tmp_path / "in.tif", random_mask(np.random.default_rng(1), (300, 300)))
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(InputError, match="pyarrow"):
            segment_file(
                identity,
                tmp_path / "in.tif",
                tmp_path / "o.tif",
                Options(output="instances", table=tmp_path / "t.parquet"),
            )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
        return
    segment_file(
        identity, tmp_path / "in.tif", tmp_path / "o.tif", Options(output="instances", table=tmp_path / "t.parquet")
    )
    segment_file(
        identity, tmp_path / "in.tif", tmp_path / "o2.tif", Options(output="instances", table=tmp_path / "t.csv")
    )
    table = pq.read_table(tmp_path / "t.parquet").to_pydict()
    csv_table = table_of(tmp_path / "t.csv")
    assert list(table) == list(csv_table)
    for k, v in csv_table.items():
        np.testing.assert_allclose(np.asarray(table[k], np.float64), v, rtol=1e-5)


def test_the_demo_model_on_a_real_looking_image_is_the_same_on_every_route(tmp_path: Path) -> None:
    from unet.synth import synth_image

    seg = Segmenter(unet.load_checkpoint(unet.checkpoint.DEMO_CHECKPOINT), device="cpu")
    sample = synth_image(np.random.default_rng([1001, 2]), (700, 500))
    tifffile.imwrite(tmp_path / "in.tif", sample.image)
    labels = segment_image(seg, read_image(tmp_path / "in.tif"))[0]
    want = label_instances(labels, instance_rule(seg.checkpoint))
    assert want.max() > 20
    for name, extra, stream in [("a.tif", {}, 1e9), ("b.tif", {"tile_size": 900}, 0)]:
        report = segment_file(
            seg, tmp_path / "in.tif", tmp_path / name, Options(output="instances", **extra), stream_above_mb=stream
        )
        np.testing.assert_array_equal(tifffile.imread(tmp_path / name), want)
        assert report.objects == int(want.max())


# --- the CLI ------------------------------------------------------------------------------

UNET_TILE = str(Path(sys.executable).with_name("unet-tile"))


def test_cli_instances_table_and_geojson(tmp_path: Path) -> None:
    """The console script with the bundled model: the image, the table and the shapes agree,
    and the object count is said."""
    from unet.synth import synth_image

    sample = synth_image(np.random.default_rng([1001, 3]), (400, 420))
    tifffile.imwrite(tmp_path / "in.tif", sample.image)
    done = subprocess.run(
        [
            UNET_TILE, "segment", tmp_path / "in.tif", "-o", tmp_path / "inst.tif", "--output", "instances",
            "--table", tmp_path / "objects.csv", "--geojson", tmp_path / "nuclei.geojson", "--precision", "fp32",
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ids = tifffile.imread(tmp_path / "inst.tif")
    n = int(ids.max())
    assert n > 10 and f"unet-tile: {n} objects" in done.stderr.splitlines()
    t = table_of(tmp_path / "objects.csv")
    assert "area_um2" not in t  # no pixel size in this file
    np.testing.assert_array_equal(t["area_px"], np.bincount(ids.ravel())[1:])
    np.testing.assert_allclose(
        t["mean_intensity"], ndimage.mean(sample.image.astype(np.float64), ids, np.arange(1, n + 1)), rtol=1e-5
    )
    assert_shapes_match(tmp_path / "nuclei.geojson", ids)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--table", "t.csv"], "a table or GeoJSON comes with instances"),
        (["--min-area", "3"], "--min-area applies to --kind instances"),
        (["--output", "instances", "--table", "nodir/t.csv"], "output directory does not exist"),
        (["--output", "instances", "--table", "in.tif"], "give the table and GeoJSON their own paths"),
        (["--output", "instances", "--min-area", "-1"], "min area must be >= 0"),
    ],
)
def test_cli_refuses_instance_options_with_one_line(
    tmp_path: Path, identity_checkpoint: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from service.cli import main

    write_input(tmp_path / "in.tif", random_mask(np.random.default_rng(0), (60, 60)))
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [
        "segment",
        str(tmp_path / "in.tif"),
        "-o",
        str(tmp_path / "o.tif"),
        "--checkpoint",
        str(identity_checkpoint),
    ]
    args += [str(tmp_path / a) if a.endswith((".csv", ".tif")) else a for a in extra]
    assert main([*args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unet-tile: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_evaluate_reports_instance_f1(tmp_path: Path, identity_checkpoint: Path) -> None:
    """The F1 of ``evaluate`` counts objects matched at IoU > 0.5 against the true ones."""
    from service.evaluate import match_instances

    truth = np.zeros((40, 60), np.int32)
    truth[5:15, 5:15], truth[5:15, 30:40], truth[25:35, 5:15] = 1, 2, 3
    pred = np.zeros_like(truth)
    pred[5:15, 5:15] = 7  # exact
    pred[5:15, 30:34] = 8  # IoU 0.4: no match
    pred[30:38, 40:50] = 9  # nothing there
    m = match_instances(pred, truth)
    assert (m.tp, m.fp, m.fn) == (1, 2, 2) and m.f1 == pytest.approx(2 / 6)
    assert match_instances(truth, truth).f1 == 1.0


def test_evaluate_prints_the_instance_f1(
    tmp_path: Path, identity: Segmenter, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import main
    from service.cli import train as train_cli

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = random_mask(np.random.default_rng(5), (200, 220))
    write_input(tmp_path / "images" / "a.tif", mask)
    truth = label_instances(mask, RULE).astype(np.uint16)
    truth[truth == 1] = 0  # one object the "model" finds that the truth lacks
    tifffile.imwrite(tmp_path / "masks" / "a.tif", truth)
    monkeypatch.setattr(train_cli, "load_segmenter", lambda args: identity)
    assert main(["evaluate", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks")]) == 0
    overall = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("overall"))
    n = int(label_instances(mask, RULE).max())
    assert f"{n - 1} matched, 1 false, 0 missed" in overall


def test_a_checkpoint_with_a_bad_instance_rule_is_refused_at_load(tmp_path: Path) -> None:
    for rule, message in [
        ({"seeds": [1], "colour": 2}, "unknown instance rule fields"),
        ({"seeds": [7]}, "classes [7]"),
    ]:
        path = tmp_path / "bad.safetensors"
        unet.save_checkpoint(path, make_model(num_classes=3), instances=rule)
        with pytest.raises(unet.CheckpointError, match=re.escape(message)):
            Segmenter(unet.load_checkpoint(path), device="cpu")


@pytest.mark.parametrize("where", ["table", "image"])
@pytest.mark.parametrize("stream_above", [1e9, 0], ids=["in-memory", "streamed"])
def test_a_full_disk_at_the_end_leaves_none_of_the_outputs(
    tmp_path: Path, identity: Segmenter, monkeypatch: pytest.MonkeyPatch, where: str, stream_above: float
) -> None:
    import service.instances

    write_input(tmp_path / "in.tif", random_mask(np.random.default_rng(2), (500, 300)))
    (tmp_path / "t.csv").write_text("a table from before\n")

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "table":
        monkeypatch.setattr(service.instances.TableWriter, "close", full)
    else:
        original = service.instances.InstanceSink.finish

        def finish(self: Any) -> None:
            self.inner.finish = full
            original(self)

        monkeypatch.setattr(service.instances.InstanceSink, "finish", finish)
    options = Options(output="instances", table=tmp_path / "t.csv", geojson=tmp_path / "s.geojson")
    with pytest.raises(OSError, match="No space"):
        segment_file(identity, tmp_path / "in.tif", tmp_path / "o.tif", options, stream_above_mb=stream_above)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "t.csv"]
    assert (tmp_path / "t.csv").read_text() == "a table from before\n"


def test_bands_fed_to_the_labeller_in_thin_slices_give_the_same_ids(
    tmp_path: Path,
    identity: Segmenter,
    case: tuple[Path, np.ndarray[Any, Any], np.ndarray[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Wide images are labelled a few rows at a time, spooled in small chunks and measured a
    few rows at a time, the table handed over as objects complete (memory); here a 700-px
    wide one: 16 rows labelled at a time, chunks of 5 rows, 3 rows measured at a time and
    the table in pieces of 2 objects."""
    import service.instances
    import tiling.instances

    src, mask, image = case
    monkeypatch.setattr(service.instances, "_SLICE_PX", 700 * 16)
    monkeypatch.setattr(tiling.instances, "_CHUNK_PX", 700 * 5)
    monkeypatch.setattr(service.instances._Measure, "_SLICE_PX", 700 * 3)
    monkeypatch.setattr(service.instances._Measure, "_ROWS", 2)
    options = Options(output="instances", table=tmp_path / "t.csv", geojson=tmp_path / "s.geojson")
    segment_file(identity, src, tmp_path / "o.tif", options, stream_above_mb=0)
    want = label_instances(mask, RULE)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o.tif"), want)
    assert_table_matches(tmp_path / "t.csv", want, image, pixel_um2=(25400 / 2.0) ** 2)
    assert_shapes_match(tmp_path / "s.geojson", want)
