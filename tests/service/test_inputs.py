"""Inputs the service must segment or refuse precisely: any axes, non-finite pixels, several series.

Every axes string tifffile can produce is either segmented plane by plane (a mask equal to
segmenting each plane alone) or refused with a 4xx / exit 2 naming the axes; never a 5xx,
a traceback or a job that fails after it was accepted. The CLI, ``/segment`` (in memory
and streamed) and ``/jobs`` (in memory and streamed) are held to the same answer.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import tiling
import unet
from service.cli import main
from service.instances import fill_holes, instance_rule
from service.pipeline import Options, segment_file, segment_image
from service.segmenter import Segmenter
from service.sources import read_image
from tests.conftest import balance_classes, make_model
from tests.service.conftest import Server

# --- helpers ------------------------------------------------------------------------------


def write_tiff(data: np.ndarray[Any, Any], writer: str, axes: str) -> bytes | None:
    """``data`` as a TIFF from one of tifffile's writers; None where tifffile refuses to write it."""
    kwargs: dict[str, Any] = {
        "shaped": {"photometric": "minisblack", "metadata": {"axes": axes}},
        "ome": {"photometric": "minisblack", "ome": True, "metadata": {"axes": axes}},
        "imagej": {"imagej": True, "metadata": {"axes": axes}},
        "pages": {"photometric": "minisblack", "metadata": None},  # a generic series of pages: I axes
    }[writer]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "zero-size array to nonconformant TIFF": such files exist
        try:
            tifffile.imwrite(buf, data, **kwargs)
        except (ValueError, TypeError, IndexError):  # OmeXmlError is a ValueError; IndexError: 1-D data
            return None
    return buf.getvalue()


def declared(data: bytes) -> tuple[str, tuple[int, ...], np.ndarray[Any, Any]]:
    """What tifffile reads back: the first series' axes, shape and pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tifffile.TiffFile(io.BytesIO(data)) as t:
            s = t.series[0]
            return str(s.axes), tuple(int(n) for n in s.shape), s.asarray()


def acceptable(axes: str, shape: tuple[int, ...], channels: int = 1) -> bool:
    """The contract: one Y, one X, at most one channel axis (C or S) of the model's size, letters
    A-Z, some pixels. Every other axis is a plane axis, repeated letters included."""
    if not all("A" <= a <= "Z" for a in axes) or axes.count("Y") != 1 or axes.count("X") != 1:
        return False
    if axes.count("C") + axes.count("S") > 1 or 0 in shape:
        return False
    c = next((i for i, a in enumerate(axes) if a in "CS"), None)
    return (shape[c] if c is not None else 1) == channels


def expected_mask(
    checkpoint: unet.Checkpoint, axes: str, pixels: np.ndarray[Any, Any], *, filled: bool = True
) -> tuple[str, np.ndarray]:
    """Each plane segmented alone, its holes filled unless ``filled`` is false (labels are filled
    by default; probabilities are the model's own); the output layout is the stack axes (input
    order) + YX."""
    y, x = axes.index("Y"), axes.index("X")
    c = next((i for i, a in enumerate(axes) if a in "CS"), None)
    stack = [i for i in range(len(axes)) if i not in (y, x, c)]
    arr = pixels.transpose([*stack, *([c] if c is not None else []), y, x])
    h, w = pixels.shape[y], pixels.shape[x]
    planes = arr.reshape(-1, 1, h, w)
    rule = instance_rule(checkpoint)
    masks = [tiling.segment(p, checkpoint.model, normalize=checkpoint.normalization.fit(p)) for p in planes]
    masks = [fill_holes(m, rule) for m in masks] if filled else masks
    shape = tuple(pixels.shape[i] for i in stack)
    return "".join(axes[i] for i in stack) + "YX", np.stack(masks).reshape(*shape, h, w)


def read_result(data: bytes) -> tuple[str, np.ndarray[Any, Any]]:
    with tifffile.TiffFile(io.BytesIO(data)) as t:
        return str(t.series[0].axes), t.series[0].asarray()


def run_cli(*args: str | Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["segment", *map(str, args), "--precision", "fp32", "-q"])
    return rc, err.getvalue()


def wait_for_job(server: Server, job_id: str, timeout: float = 120) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = server.get(f"/jobs/{job_id}").json()
        if body["state"] in ("done", "failed", "cancelled"):
            return body
        assert time.monotonic() < end, f"job never finished: {body}\n{server.log_text()}"
        time.sleep(0.05)


def segment_via_job(server: Server, data: bytes, query: str = "") -> tuple[httpx.Response, dict[str, Any] | None]:
    """POST /jobs; on 202, wait and return the result download and the final record."""
    r = server.post(f"/jobs{query}", content=data, headers={"Content-Type": "image/tiff"})
    if r.status_code != 202:
        return r, None
    record = wait_for_job(server, r.json()["id"])
    return server.get(f"/jobs/{record['id']}/result"), record


# --- axes as tifffile writes them ---------------------------------------------------------

PLANE_LETTERS = "QZTIAPRHELVMJK"


@st.composite
def layouts(draw: st.DrawFn) -> tuple[str, str, tuple[int, ...]]:
    """(writer, axes, shape): valid layouts of every series kind, and arbitrary strings."""
    writer = draw(st.sampled_from(["shaped", "shaped", "shaped", "shaped", "ome", "imagej", "pages"]))
    if writer == "imagej":
        axes = draw(st.sampled_from(["TYX", "ZYX", "CYX", "TZYX", "ZCYX", "TZCYX"]))
    elif writer == "ome":
        letters = draw(st.lists(st.sampled_from("TZCQ"), min_size=1, max_size=2, unique=True))
        axes = "".join(letters) + "YX"
    elif writer == "pages":
        axes = "QYX"  # the letters are tifffile's choice: I
    elif draw(st.booleans()):  # a valid layout by construction, Y and X anywhere
        parts = draw(st.lists(st.sampled_from(PLANE_LETTERS), max_size=3))
        parts += [*draw(st.sampled_from([[], ["C"], ["S"]])), "Y", "X"]
        axes = "".join(draw(st.permutations(parts)))
    else:  # anything: repeated Y/X/C/S, both C and S, no Y or X, lower case
        axes = draw(st.text(alphabet="QZCSYXq", min_size=1, max_size=5))

    def size(a: str) -> int:
        if a in "YX":
            return draw(st.integers(1, 20))
        if a in "CS":
            return draw(st.sampled_from([1, 1, 2]))
        return draw(st.integers(1, 2))

    shape = tuple(size(a) for a in axes)
    if draw(st.integers(0, 9)) == 0:  # now and then an empty one
        shape = (*shape[:-1], 0)
    return writer, axes, shape


@st.composite
def tiffs(draw: st.DrawFn) -> bytes:
    writer, axes, shape = draw(layouts())
    dtype = draw(st.sampled_from(["uint8", "uint16", "float32"]))
    planes = math.prod(n for a, n in zip(axes, shape, strict=True) if a not in "YX")
    if planes > 3:  # keep each example to a few forward passes
        shape = tuple(1 if a not in "YX" else n for a, n in zip(axes, shape, strict=True))
    data = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 250, shape).astype(dtype)
    encoded = write_tiff(data, writer, axes)
    if encoded is None:  # tifffile would not write it: the same pixels as a shaped series
        encoded = write_tiff(data, "shaped", axes)
    assume(encoded is not None)  # 1-D data: no TIFF at all
    assert encoded is not None
    return encoded


def sample(shape: tuple[int, ...], writer: str, axes: str, dtype: str = "uint8") -> bytes:
    data = write_tiff(np.random.default_rng(0).integers(0, 250, shape).astype(dtype), writer, axes)
    assert data is not None
    return data


QQQ = sample((2, 2, 2, 16, 16), "shaped", "QQQYX")  # the issue's example
# every kind of case at least once, whatever the random examples turn out to be
EXAMPLES = [
    sample((9, 2, 7), "shaped", "YZX"),  # Y and X not last: segmented, written ZYX
    sample((2, 9, 1), "shaped", "ZYX"),  # one pixel wide: tifffile drops a trailing 1 of shaped data
    sample((1, 9, 1), "shaped", "ZYX"),
    sample((2, 1, 11, 3), "shaped", "ZSXY", "float32"),  # a size-1 S axis, X before Y
    sample((1, 2, 1, 12, 10), "imagej", "TZCYX", "uint16"),
    sample((3, 12, 10), "pages", "QYX"),  # a generic series: IYX
    sample((2, 12, 10), "ome", "CYX"),  # 2 channels for a 1-channel model: 422 naming the axes
    sample((2, 12, 10, 3), "shaped", "CYXS"),  # both C and S
    sample((2, 12, 10), "shaped", "YYX"),  # two Y
    sample((2, 12, 10), "shaped", "QZT"),  # no Y, no X
    sample((2, 12, 10), "shaped", "qYX"),  # not a letter A-Z
    sample((0, 12, 10), "shaped", "ZYX"),  # no pixels
]


def with_examples(test: Callable[..., None]) -> Callable[..., None]:
    for data in reversed(EXAMPLES):
        test = example(data=data)(test)
    return test


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint: Path) -> unet.Checkpoint:
    return unet.load_checkpoint(small_checkpoint)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tiffs())
@with_examples
def test_any_axes_through_the_cli_are_segmented_plane_by_plane_or_refused_with_exit_2(
    small_checkpoint: Path, checkpoint: unet.Checkpoint, data: bytes
) -> None:
    axes, shape, pixels = declared(data)
    event("segmented" if acceptable(axes, shape) else "refused")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.tif", Path(tmp) / "out.tif"
        src.write_bytes(data)
        for extra in ([], ["--stream-above", "0"]):  # in memory, streamed
            rc, err = run_cli(src, "-o", out, "--checkpoint", small_checkpoint, *extra)
            if not acceptable(axes, shape):
                assert rc == 2, err
                assert err.count("\n") == 1 and f"axes {axes!a}" in err, err
                assert not out.exists()
                continue
            assert rc == 0, err
            want_axes, want = expected_mask(checkpoint, axes, pixels)
            got_axes, got = read_result(out.read_bytes())
            assert got_axes == want_axes
            np.testing.assert_array_equal(got, want)
            if axes.replace("C", "").replace("S", "").endswith("YX"):  # the usual files: the input's shape
                assert got.shape == tuple(n for a, n in zip(axes, shape, strict=True) if a not in "CS")


@pytest.fixture(scope="module")
def servers(launch: Callable[..., Server], small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """In-memory (/segment and in-memory jobs) and streamed (spooled /segment, streamed jobs)."""
    memory = launch(small_checkpoint, jobs_dir=str(tmp_path_factory.mktemp("jobs-mem")), device="cpu")
    streamed = launch(
        small_checkpoint,
        jobs_dir=str(tmp_path_factory.mktemp("jobs-stream")),
        spool_mb="0",
        stream_above_mb="0",
        device="cpu",
    )
    return memory, streamed


@pytest.mark.slow
@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tiffs())
@with_examples
def test_any_axes_over_http_are_segmented_plane_by_plane_or_refused_with_a_4xx(
    servers: tuple[Server, Server], checkpoint: unet.Checkpoint, data: bytes
) -> None:
    axes, shape, pixels = declared(data)
    ok = acceptable(axes, shape)
    want = expected_mask(checkpoint, axes, pixels) if ok else None
    for server in servers:
        answers = [server.post("/segment", content=data, headers={"Content-Type": "image/tiff"})]
        job_answer, record = segment_via_job(server, data)
        answers.append(job_answer)
        for r in answers:
            if not ok:
                assert 400 <= r.status_code < 500, (r.status_code, r.text)
                assert f"axes {axes!a}" in r.json()["detail"]
                continue
            assert r.status_code == 200, (r.status_code, r.text, record)
            assert want is not None
            got_axes, got = read_result(r.content)
            assert got_axes == want[0]
            np.testing.assert_array_equal(got, want[1])
        if ok:
            assert record is not None and record["state"] == "done"


def test_repeated_plane_letters_the_issue_example(
    servers: tuple[Server, Server], small_checkpoint: Path, checkpoint: unet.Checkpoint, tmp_path: Path
) -> None:
    """QQQYX: /segment answered 500, /jobs failed with "repeated axis in transpose", the CLI
    exited 1; now every path gives the per-plane mask with axes QQQYX, probabilities QQQCYX."""
    assert QQQ is not None
    axes, _, pixels = declared(QQQ)
    assert axes == "QQQYX"
    _, want = expected_mask(checkpoint, axes, pixels)
    (tmp_path / "q.tif").write_bytes(QQQ)
    assert run_cli(tmp_path / "q.tif", "-o", tmp_path / "o.tif", "--checkpoint", small_checkpoint)[0] == 0
    assert read_result((tmp_path / "o.tif").read_bytes())[0] == "QQQYX"
    for server in servers:
        r = server.post("/segment", content=QQQ, headers={"Content-Type": "image/tiff"})
        assert r.status_code == 200 and r.headers["X-Image-Axes"] == "QQQYX"
        got_axes, got = read_result(r.content)
        assert got_axes == "QQQYX"
        np.testing.assert_array_equal(got, want)
        job, record = segment_via_job(server, QQQ)
        assert record is not None and record["state"] == "done", record
        np.testing.assert_array_equal(read_result(job.content)[1], want)
    memory = servers[0]
    probs = memory.post("/segment?output=probabilities", content=QQQ, headers={"Content-Type": "image/tiff"})
    p_axes, p = read_result(probs.content)
    assert p_axes == "QQQCYX" and p.shape == (2, 2, 2, 2, 16, 16)
    np.testing.assert_array_equal(p.argmax(axis=3), expected_mask(checkpoint, axes, pixels, filled=False)[1])


# --- non-finite pixels ---------------------------------------------------------------------


def blobs(shape: tuple[int, int], seed: int = 0) -> np.ndarray[Any, Any]:
    """Smooth float32 content with integer values (many ties: one pixel more or less leaves the
    percentiles where they are)."""
    a = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 4)
    a = (a - a.min()) / (a.max() - a.min()) * 250
    return np.round(a).astype(np.float32)


MARGIN = unet.geometry.context_margin(4)  # an output pixel sees the input within this many px


def near(shape: tuple[int, int], y: int, x: int) -> np.ndarray[Any, Any]:
    """Pixels whose receptive field holds (y, x)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.asarray((np.abs(yy - y) <= MARGIN) & (np.abs(xx - x) <= MARGIN))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    """A small random model whose head bias splits blob images into both classes."""
    image = blobs((572, 572), seed=99)[None]
    x = torch.from_numpy(unet.Normalization().fit(image)(image[None]))
    path = tmp_path_factory.mktemp("blob-ck") / "blobs.safetensors"
    unet.save_checkpoint(path, balance_classes(make_model(seed=2), x))
    return Segmenter(unet.load_checkpoint(path), device="cpu", precision="fp32", batch_size=2)


def both_paths(
    segmenter: Segmenter, image: np.ndarray[Any, Any], tmp: Path, *, fill: bool = True
) -> np.ndarray[Any, Any]:
    """The in-memory and streamed masks of a 2-D image; they must be equal. With ``fill`` off
    (``--keep-holes``) the no-data rule stands alone; with it on (the default) the result is
    that mask with its holes filled: a no-data pixel inside one nucleus is part of it."""
    tifffile.imwrite(tmp / "in.tif", image, tile=(64, 64), compression="zlib")
    options = Options(tile_size=100, fill_holes=fill)
    memory = segment_image(segmenter, read_image(tmp / "in.tif"), options)[0]
    assert segment_file(segmenter, tmp / "in.tif", tmp / "out.tif", options, stream_above_mb=0).route.streamed
    np.testing.assert_array_equal(tifffile.imread(tmp / "out.tif"), memory)
    if fill:
        kept = both_paths(segmenter, image, tmp, fill=False)
        np.testing.assert_array_equal(memory, fill_holes(kept, instance_rule(segmenter.checkpoint)))
    return np.asarray(memory)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_one_non_finite_pixel_changes_the_mask_only_within_its_receptive_field(
    segmenter: Segmenter, tmp_path: Path, bad: float
) -> None:
    """Before: one NaN made every percentile NaN and the whole mask background; one inf made the
    span infinite and most of the mask one class."""
    clean = blobs((300, 320))
    y, x = 150, 170
    poisoned = clean.copy()
    poisoned[y, x] = bad
    norm = segmenter.checkpoint.normalization
    a, b = norm.fit(clean[None]), norm.fit(poisoned[None])
    assert (a.scale, a.offset) == (b.scale, b.offset)  # fitted on the finite pixels (ties: the same numbers)
    want = both_paths(segmenter, clean, tmp_path, fill=False)
    got = both_paths(segmenter, poisoned, tmp_path, fill=False)
    both_paths(segmenter, poisoned, tmp_path)  # filled: the kept mask, its holes filled, on both paths
    assert 0.1 < want.mean() < 0.9, "the test model should give both classes"
    far = ~near(clean.shape, y, x)
    np.testing.assert_array_equal(got[far], want[far])
    if np.isnan(bad):
        assert got[y, x] == segmenter.background == 0  # no data: background, whatever is around it


def test_nan_regions_are_background_and_stacks_keep_their_other_planes(segmenter: Segmenter, tmp_path: Path) -> None:
    """A NaN block across tile borders is background in both paths; an all-NaN plane of a stack
    is all background (no data) while the other plane is segmented as if alone."""
    image = blobs((260, 300), seed=1)
    image[40:180, 90:230] = np.nan
    mask = both_paths(segmenter, image, tmp_path)
    assert (mask[40:180, 90:230] == 0).all() and mask.any()

    stack = np.stack([blobs((120, 130), seed=2), np.full((120, 130), np.nan, np.float32)])
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"}, photometric="minisblack")
    alone = segment_image(segmenter, read_image(tmp_path / "z.tif"), Options(tile_size=100))
    assert (alone[1] == 0).all()
    tifffile.imwrite(tmp_path / "z0.tif", stack[0])
    np.testing.assert_array_equal(
        alone[0], segment_image(segmenter, read_image(tmp_path / "z0.tif"), Options(tile_size=100))[0]
    )
    segment_file(segmenter, tmp_path / "z.tif", tmp_path / "z-out.tif", Options(tile_size=100), stream_above_mb=0)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "z-out.tif"), alone)


def test_all_nan_image_is_all_background_everywhere(
    servers: tuple[Server, Server], small_checkpoint: Path, tmp_path: Path
) -> None:
    image = np.full((40, 50), np.nan, np.float32)
    (tmp_path / "nan.tif").write_bytes(write_tiff(image, "shaped", "YX") or b"")
    rc, err = run_cli(tmp_path / "nan.tif", "-o", tmp_path / "o.tif", "--checkpoint", small_checkpoint)
    assert rc == 0, err
    assert (tifffile.imread(tmp_path / "o.tif") == 0).all()
    data = (tmp_path / "nan.tif").read_bytes()
    for server in servers:
        r = server.post("/segment", content=data, headers={"Content-Type": "image/tiff"})
        assert r.status_code == 200, r.text
        assert (read_result(r.content)[1] == 0).all()
    p = servers[0].post("/segment?output=probabilities", content=data, headers={"Content-Type": "image/tiff"})
    probs = read_result(p.content)[1]
    assert (probs[0] == 1).all() and (probs[1] == 0).all()  # background for sure, not NaN


def test_nan_and_inf_masks_agree_over_http_in_memory_and_streamed(
    servers: tuple[Server, Server], checkpoint: unet.Checkpoint
) -> None:
    image = blobs((200, 210), seed=3)
    image[20, 30], image[100:110, 50:70], image[150, 150] = np.nan, np.nan, np.inf
    data = write_tiff(image, "shaped", "YX")
    assert data is not None
    masks = []
    for server in servers:
        r = server.post("/segment", content=data, headers={"Content-Type": "image/tiff"})
        assert r.status_code == 200, r.text
        masks.append(read_result(r.content)[1])
        kept = server.post("/segment?keep_holes=true", content=data, headers={"Content-Type": "image/tiff"})
        assert kept.status_code == 200, kept.text
        masks.append(read_result(kept.content)[1])
    np.testing.assert_array_equal(masks[0], masks[2])
    np.testing.assert_array_equal(masks[1], masks[3])
    assert (masks[1][100:110, 50:70] == 0).all() and masks[1][20, 30] == 0  # no data: background
    np.testing.assert_array_equal(masks[0], fill_holes(masks[1], instance_rule(checkpoint)))  # the default: filled


# --- several series ------------------------------------------------------------------------


def two_series() -> tuple[bytes, np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """An OME-TIFF holding two images of different sizes (tiled, so the streamed path reads it)."""
    first, second = blobs((90, 110), seed=4).astype(np.uint16), blobs((60, 70), seed=5).astype(np.uint16)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, ome=True) as tif:
        tif.write(first, tile=(32, 32), compression="zlib", photometric="minisblack")
        tif.write(second, tile=(32, 32), compression="zlib", photometric="minisblack")
    return buf.getvalue(), first, second


def plain_mask(checkpoint: unet.Checkpoint, image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The engine alone on one 2-D image, its holes filled (the default)."""
    mask = tiling.segment(image[None], checkpoint.model, normalize=checkpoint.normalization.fit(image[None]))
    return fill_holes(mask, instance_rule(checkpoint))


def test_cli_segments_the_chosen_series_and_says_there_are_several(
    small_checkpoint: Path, checkpoint: unet.Checkpoint, tmp_path: Path
) -> None:
    data, first, second = two_series()
    (tmp_path / "two.ome.tif").write_bytes(data)
    out = tmp_path / "o.tif"
    for extra in ([], ["--stream-above", "0"]):
        rc, err = run_cli(tmp_path / "two.ome.tif", "-o", out, "--checkpoint", small_checkpoint, *extra)
        assert rc == 0, err
        assert err == "unet-tile: warning: input holds 2 series; segmented series 0 (--series N for another)\n"
        np.testing.assert_array_equal(tifffile.imread(out), plain_mask(checkpoint, first))
        rc, err = run_cli(
            tmp_path / "two.ome.tif", "-o", out, "--checkpoint", small_checkpoint, "--series", "1", *extra
        )
        assert rc == 0 and "segmented series 1" in err, err
        np.testing.assert_array_equal(tifffile.imread(out), plain_mask(checkpoint, second))
    out.unlink()
    rc, err = run_cli(tmp_path / "two.ome.tif", "-o", out, "--checkpoint", small_checkpoint, "--series", "2")
    assert rc == 2 and err.count("\n") == 1 and "the file holds 2 series" in err, err
    assert not out.exists()
    tifffile.imwrite(tmp_path / "one.tif", first)
    rc, err = run_cli(tmp_path / "one.tif", "-o", out, "--checkpoint", small_checkpoint)
    assert rc == 0 and err == ""  # one series: nothing to say


def test_http_segments_the_chosen_series_and_reports_it(
    servers: tuple[Server, Server], checkpoint: unet.Checkpoint
) -> None:
    data, first, second = two_series()
    want = {0: plain_mask(checkpoint, first), 1: plain_mask(checkpoint, second)}
    for server in servers:
        for query, index in (("", 0), ("?series=1", 1)):
            r = server.post(f"/segment{query}", content=data, headers={"Content-Type": "image/tiff"})
            assert r.status_code == 200, r.text
            assert r.headers["X-Series"] == f"{index}/2"
            np.testing.assert_array_equal(read_result(r.content)[1], want[index])
            job, record = segment_via_job(server, data, query)
            assert record is not None and record["state"] == "done", record
            assert (record["image"]["series"], record["image"]["series_count"]) == (index, 2)
            assert record["options"]["series"] == index
            np.testing.assert_array_equal(read_result(job.content)[1], want[index])
        for query in ("?series=2", "?series=-1"):
            for route in ("/segment", "/jobs"):
                r = server.post(f"{route}{query}", content=data, headers={"Content-Type": "image/tiff"})
                assert r.status_code == 422, r.text
        r = server.post("/segment?series=2", content=data, headers={"Content-Type": "image/tiff"})
        assert "the file holds 2 series" in r.json()["detail"]
        one = write_tiff(first, "shaped", "YX")
        assert one is not None
        assert server.post("/segment", content=one).headers["X-Series"] == "0/1"
