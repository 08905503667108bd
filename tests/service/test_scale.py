"""Object size: the diameter setting, the automatic estimate, every path at a scale, no holes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tifffile
from scipy import ndimage

import tiling
import unet
from service.errors import OptionError
from service.evaluate import dice, match_instances
from service.instances import HoleFillSink, instance_rule, scaled_rule
from service.io import ImageData, ImageHeader
from service.pipeline import Options, resolve, segment_file, segment_image
from service.scale import Scale, object_diameter, parse_diameter
from service.segmenter import Segmenter
from service.sinks import MemorySink
from service.sources import ArraySource
from tests.service.conftest import Server
from tiling.instances import InstanceRule, label_instances
from unet.synth import synth_image

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
HEADERS = {"Content-Type": "image/tiff"}


@pytest.fixture(scope="module")
def demo() -> Segmenter:
    return Segmenter(unet.load_checkpoint(unet.checkpoint.DEMO_CHECKPOINT), device="cpu", precision="fp32")


def _data(image: npt.NDArray[Any]) -> ImageData:
    header = ImageHeader(image.shape, "YX", image.dtype, None, None, None)
    return ImageData(header, image[None, None])


def _upscaled(image: npt.NDArray[Any], mask: npt.NDArray[Any], k: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """A stand-in for a k-times higher magnification: bicubic image, nearest mask."""
    big = ndimage.zoom(image.astype(np.float32), k, order=3)
    return np.clip(np.rint(big), 0, np.iinfo(image.dtype).max).astype(image.dtype), np.kron(
        mask, np.ones((k, k), mask.dtype)
    )


# --- the setting ---------------------------------------------------------------------------


def test_diameter_values() -> None:
    assert parse_diameter("auto") == "auto" and parse_diameter("OFF") == "off" and parse_diameter(" 42.5") == 42.5
    for bad in ("-3", "0", "big", "nan", "1e9"):
        with pytest.raises(OptionError, match="diameter"):
            parse_diameter(bad)


def test_the_demo_checkpoint_records_its_object_size() -> None:
    size = unet.load_checkpoint(unet.checkpoint.DEMO_CHECKPOINT).size
    assert size is not None and size.low < size.native < size.high
    assert size.trained is not None and size.trained[0] < size.low and size.pixel_size_um is not None
    assert size.factor(size.native) == 1.0 and size.factor(size.high * 3) == pytest.approx(
        size.native / (size.high * 3)
    )


def test_object_diameter_is_the_area_weighted_median() -> None:
    ids = np.zeros((200, 200), np.uint32)
    yy, xx = np.mgrid[:200, :200]
    for i, (cy, cx, r) in enumerate([(50, 50, 20), (50, 130, 20), (140, 60, 20), (150, 150, 3)], start=1):
        ids[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = i  # three 40-px discs and one fragment
    assert object_diameter(ids) == pytest.approx(40, abs=1)
    assert object_diameter(np.zeros((5, 5), np.uint32)) is None


@pytest.mark.parametrize(
    ("options", "how", "factor"),
    [
        (Options(diameter="off"), "off", 1.0),
        (Options(diameter=96.0), "diameter", None),
        (Options(diameter=6.0), "diameter", None),
    ],
)
def test_explicit_settings(demo: Segmenter, options: Options, how: str, factor: float | None) -> None:
    size = demo.checkpoint.size
    assert size is not None
    image = np.zeros((300, 200), np.uint16)
    scale = resolve(demo, ArraySource.of(_data(image)), options).scale
    assert scale is not None and scale.how == how and scale.passes == 0
    expected = factor if factor is not None else size.native / float(options.diameter)  # type: ignore[arg-type]
    assert scale.factor == pytest.approx(expected)
    assert scale.shape == (max(1, round(300 * scale.factor)), max(1, round(200 * scale.factor)))


def test_pixel_size_uses_the_models_and_is_refused_without_one(demo: Segmenter, tiny_checkpoint: Path) -> None:
    size = demo.checkpoint.size
    assert size is not None and size.pixel_size_um is not None
    src = ArraySource.of(_data(np.zeros((64, 64), np.uint16)))
    scale = resolve(demo, src, Options(pixel_size=size.pixel_size_um / 2)).scale
    assert scale is not None and scale.how == "pixel-size" and scale.factor == pytest.approx(0.5)
    tiny = Segmenter(unet.load_checkpoint(tiny_checkpoint), device="cpu")
    with pytest.raises(OptionError, match="records no pixel size"):
        resolve(tiny, src, Options(pixel_size=0.3))
    with pytest.raises(OptionError, match="records no object size"):
        resolve(tiny, src, Options(diameter=30.0))
    assert resolve(tiny, src, Options()).scale == Scale(1.0, (64, 64), "unknown")


# --- the estimate --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    return tifffile.imread(REAL / "nuclei-widefield.tif"), tifffile.imread(REAL / "nuclei-widefield-mask.tif")


def test_objects_in_range_are_left_at_their_scale(demo: Segmenter, real: tuple[Any, Any]) -> None:
    image, _ = real
    scale = resolve(demo, ArraySource.of(_data(image)), Options()).scale
    assert scale is not None and scale.how == "auto" and not scale.rescaled
    assert scale.diameter_px is not None and 18 < scale.diameter_px < 34  # nuclei ~25 px across


def test_a_2x_magnification_is_found_and_segmented_as_well(demo: Segmenter, real: tuple[Any, Any]) -> None:
    """The issue's floor: the real image upscaled 2x (bicubic), default options, Dice >= 0.85."""
    image, mask = _upscaled(*real, 2)
    result = segment_image(demo, _data(image), Options(output="labels"))[0]
    assert result.shape == image.shape
    scale = resolve(demo, ArraySource.of(_data(image)), Options()).scale
    assert scale is not None and scale.rescaled and 0.3 < scale.factor < 0.75
    assert scale.diameter_px is not None and 38 < scale.diameter_px < 68
    assert dice(result > 0, mask > 0) >= 0.85
    ids = segment_image(demo, _data(image), Options(output="instances"))[0]
    assert match_instances(ids, mask).f1 >= 0.8


# --- every path gives the same result at a scale ---------------------------------------------


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic nuclei, then enlarged 3x: objects far outside the model's range."""
    sample = synth_image(np.random.default_rng([1001, 2]), (220, 260), dtype="uint16")
    image, _ = _upscaled(sample.image, sample.labels, 3)
    path = tmp_path_factory.mktemp("large") / "large.tif"
    tifffile.imwrite(path, image, tile=(128, 128))
    return path


@pytest.mark.parametrize("output", ["labels", "instances"])
def test_in_memory_streamed_and_tile_sizes_agree_at_a_scale(
    demo: Segmenter, large: Path, tmp_path: Path, output: str
) -> None:
    options = Options(output=output, diameter=30.0)  # type: ignore[arg-type]  # 0.8x: several tiles of 388
    ref = segment_file(demo, large, tmp_path / "mem.tif", options)
    assert ref.scale is not None and ref.scale.factor == pytest.approx(demo.checkpoint.size.native / 30.0)  # type: ignore[union-attr]
    assert not ref.route.streamed
    streamed = segment_file(demo, large, tmp_path / "str.tif", options, stream_above_mb=0)
    assert streamed.route.streamed and streamed.tiles == ref.tiles
    bigger = segment_file(demo, large, tmp_path / "644.tif", replace(options, tile_size=644))
    a = tifffile.imread(tmp_path / "mem.tif")
    assert a.shape == tifffile.imread(large).shape and a.max() > 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "str.tif"), a)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "644.tif"), a)
    assert bigger.tiles < ref.tiles


def test_the_rescaled_result_is_the_scaled_pass_mapped_back(demo: Segmenter, large: Path) -> None:
    """Labels at a scale = argmax of the class scores of the rescaled pass, resampled back."""
    image = tifffile.imread(large)
    options = Options(diameter=60.0, fill_holes=False)
    labels = segment_image(demo, _data(image), options)[0]
    probs = segment_image(demo, _data(image), replace(options, output="probabilities"))[0]
    np.testing.assert_array_equal(labels, probs.argmax(0))
    scale = resolve(demo, ArraySource.of(_data(image)), options).scale
    assert scale is not None
    small = tiling.rescale.RescaledPlane(image[None], scale.shape)[...]
    affine = demo.checkpoint.normalization.fit(image[None])
    direct = tiling.segment(small, demo.predictor, output="probabilities", normalize=affine)
    back = (
        tiling.rescale.axis_weights(scale.shape[0], image.shape[0]),
        tiling.rescale.axis_weights(scale.shape[1], image.shape[1]),
    )
    expected = np.stack([back[0] @ c.astype(np.float64) @ back[1].T for c in direct])
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_the_instance_rule_follows_the_scale() -> None:
    rule = InstanceRule(seeds=(1,), grow=(2,), min_area=20, grow_px=4)
    assert scaled_rule(rule, 1.0) == rule
    assert scaled_rule(rule, 1 / 3) == replace(rule, min_area=180, grow_px=12)
    assert scaled_rule(rule, 1 / 3, min_area_given=True) == replace(rule, grow_px=12)


# --- holes ---------------------------------------------------------------------------------


def _holey_classes() -> npt.NDArray[np.uint8]:
    """A nucleus with two holes (one with an island), three touching nuclei around a gap,
    and a ring open to the image border."""
    c = np.zeros((120, 300), np.uint8)
    yy, xx = np.mgrid[:120, :300]
    c[(yy - 40) ** 2 + (xx - 50) ** 2 < 30**2] = 1
    c[(yy - 30) ** 2 + (xx - 45) ** 2 < 6**2] = 0  # a hole
    c[(yy - 50) ** 2 + (xx - 60) ** 2 < 8**2] = 0  # a hole with a speck in it
    c[50, 60] = 1
    centres = [(40, 160), (40, 196), (71, 178)]  # three touching nuclei, a gap between them
    dist = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    owner = dist.argmin(0)
    inside = dist.min(0) < 19
    three = np.where(inside, owner + 1, 0)
    c[inside] = 1
    contact = np.zeros_like(inside)
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        other = np.roll(three, (dy, dx), axis=(0, 1))
        contact |= inside & (other > 0) & (other != three)
    c[contact] = 2  # their contact lines: the boundary class
    ring = ((yy - 112) ** 2 + (xx - 270) ** 2 < 25**2) & ((yy - 112) ** 2 + (xx - 270) ** 2 >= 12**2)
    c[ring] = 1  # its inside runs off the bottom edge: not a hole
    return c


def _fill(classes: npt.NDArray[np.uint8], rule: InstanceRule, spool: Path | None, tile: int) -> npt.NDArray[Any]:
    header = ImageHeader(classes.shape, "YX", np.dtype(np.uint8), None, None, None)
    memory = MemorySink(header, "labels", 3)
    sink = HoleFillSink(memory, header, rule, spool_dir=spool)
    plan = tiling.plan_tiles(classes.shape, tile_size=tile)
    plane = sink.plane(0, plan)
    for t in plan.tiles:
        y = np.zeros(plan.tile_out, np.uint8)
        y[t.keep] = classes[t.dest]
        plane.add(t, y)
    plane.finish()
    sink.finish()
    assert spool is None or not any(spool.iterdir())  # the spools are gone
    return memory.result[0]


def test_holes_inside_one_nucleus_are_filled_and_nothing_else(tmp_path: Path) -> None:
    classes = _holey_classes()
    rule = InstanceRule(seeds=(1,), grow=(2,), min_area=5)
    filled = _fill(classes, rule, None, 388)
    changed = filled != classes
    assert (filled[changed] == 1).all() and (classes[changed] == 0).all()
    assert filled[30, 45] == 1 and filled[50, 56] == 1  # both holes, the speck's too
    ids = label_instances(classes, rule)
    assert classes[50, 178] == 0 and filled[50, 178] == 0 and ids[50, 178] == 0  # the gap between three stays
    assert classes[115, 270] == 0 and filled[115, 270] == 0  # open to the border
    np.testing.assert_array_equal(changed, (classes == 0) & (ids > 0))  # exactly what the instances fill
    for tile in (4, 100):  # streamed, in thin bands: the same
        np.testing.assert_array_equal(_fill(classes, rule, tmp_path, tile), filled)


def test_labels_have_no_holes_unless_asked(demo: Segmenter) -> None:
    """A nucleus with a dark, textured interior: the model may leave holes; the output never does."""
    image = np.full((200, 200), 200, np.uint16)
    yy, xx = np.mgrid[:200, :200]
    inside = (yy - 100) ** 2 + (xx - 100) ** 2 < 60**2
    image[inside] = 3000
    image[(yy - 100) ** 2 + (xx - 100) ** 2 < 25**2] = 260  # a large dark nucleolus
    kept = segment_image(demo, _data(image), Options(diameter="off", fill_holes=False))[0]
    filled = segment_image(demo, _data(image), Options(diameter="off"))[0]
    rule = instance_rule(demo.checkpoint)
    holes = (kept == 0) & (label_instances(kept, rule) > 0)
    np.testing.assert_array_equal(filled[holes], 1)
    np.testing.assert_array_equal(filled[~holes], kept[~holes])
    assert not (ndimage.binary_fill_holes(filled > 0) & (filled == 0)).any()


# --- reported ------------------------------------------------------------------------------


def test_the_cli_says_how_it_rescaled(demo: Segmenter, large: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.tif"
    cmd = [sys.executable, "-m", "service.cli", "segment", str(large), "-o", str(out), "--diameter"]
    r = subprocess.run([*cmd, "60"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert tifffile.imread(out).shape == tifffile.imread(large).shape
    factor = demo.checkpoint.size.native / 60  # type: ignore[union-attr]
    assert f"unet-tile: scale {factor:.3g} (diameter, objects ~60 px)" in r.stderr, r.stderr
    quiet = subprocess.run([*cmd, "60", "-q"], capture_output=True, text=True, timeout=300, check=False)
    assert quiet.returncode == 0 and quiet.stderr == ""
    bad = subprocess.run([*cmd, "huge"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "diameter must be" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def server(launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    jobs = tmp_path_factory.mktemp("jobs")
    return launch(unet.checkpoint.DEMO_CHECKPOINT, device="cpu", precision="fp32", jobs_dir=str(jobs))


def test_http_reports_the_scale(server: Server, large: Path) -> None:
    body = large.read_bytes()
    model = server.get("/model").json()
    assert model["size"]["native"] > 0 and model["size"]["low"] < model["size"]["high"]
    r = server.post("/segment", params={"diameter": "60"}, content=body, headers=HEADERS)
    assert r.status_code == 200, r.text
    factor = model["size"]["native"] / 60
    assert r.headers["x-scale"] == f"{factor:.4g}; diameter; diameter=60.0px"
    off = server.post("/segment", params={"diameter": "off"}, content=body, headers=HEADERS)
    assert off.headers["x-scale"] == "1; off" and int(off.headers["x-tiles"]) > int(r.headers["x-tiles"])
    bad = server.post("/segment", params={"diameter": "-4"}, content=body, headers=HEADERS)
    assert bad.status_code == 422
    job = server.post("/jobs", params={"diameter": "60"}, content=body, headers=HEADERS)
    assert job.status_code == 202, job.text
    status = _wait_job(server, job.json()["url"])
    assert status["state"] == "done", status
    assert status["scale"]["how"] == "diameter" and status["scale"]["diameter_px"] == 60.0
    assert status["progress"]["tiles_done"] == status["progress"]["tiles_total"]
    result = server.get(status["result_url"])
    np.testing.assert_array_equal(tifffile.imread(_bytes(result.content)), tifffile.imread(_bytes(r.content)))


def _wait_job(server: Server, url: str) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for _ in range(600):
        status = server.get(url).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {url} did not end: {json.dumps(status)}")


def _bytes(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
