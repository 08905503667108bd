"""Admission from the header: the work arithmetic (held to :func:`tiling.plan_tiles`) and every limit of
:func:`service.admission.admit`, on the headers of real TIFF files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

import unet
from service.admission import Admitted, admit, check_work, plan_work
from service.errors import ImageTooLargeError, UnsupportedImageError
from service.io import ImageHeader, read_header
from service.segmenter import Segmenter
from service.settings import Settings
from tiling import plan_tiles
from unet import GeometryError


def header(shape: tuple[int, ...], axes: str = "YX") -> ImageHeader:
    return ImageHeader(shape, axes, np.dtype("uint8"), None, None, None)


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint: Path) -> Segmenter:
    """1 channel, 2 classes, depth 4."""
    return Segmenter(unet.load_checkpoint(tiny_checkpoint), device="cpu", batch_size=1)


def tiff(data: np.ndarray[Any, Any], **kw: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, data, **kw)
    return buf.getvalue()


def parsed(body: bytes) -> tuple[ImageHeader, set[int]]:
    """A real TIFF's header and its series' compression codes, as a caller reads them for :func:`admit`."""
    with tifffile.TiffFile(io.BytesIO(body)) as tif:
        codes = {int(page.compression) for page in tif.series[0].pages if isinstance(page, tifffile.TiffPage)}
    return read_header(body), codes


def test_plan_work_counts_the_tiles_that_plan_tiles_lays_out() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        depth = int(rng.integers(2, 5))
        shape = (int(rng.integers(1, 900)), int(rng.integers(1, 900)))
        if rng.random() < 0.2:  # strips and specks
            shape = (int(rng.integers(1, 20)), int(rng.integers(1, 5000)))
        sizes = unet.geometry.valid_input_sizes(depth, stop=1600)
        tile = sizes[int(rng.integers(len(sizes)))] - 2 * unet.geometry.context_margin(depth)
        plan = plan_tiles(shape, depth=depth, tile_size=tile)
        work = plan_work(*shape, 3, tile, depth)
        assert work.tiles == 3 * len(plan), (shape, tile, depth)
        assert work.tile_in == plan.tile_in
        assert work.computed == 3 * len(plan) * plan.tile_in[0] * plan.tile_in[1]


@pytest.mark.parametrize(
    ("shape", "axes", "jobs"),
    [
        ((16384, 16384), "YX", False),  # UNET_MAX_PIXELS on /segment
        ((131072, 131072), "YX", True),  # UNET_JOBS_MAX_PIXELS = 2**34, square
        ((16384, 2**20), "YX", True),  # 2**34, wide
        ((256, 2**26), "YX", True),  # 2**34, a strip one tile high
        ((1, 1), "YX", False),
        ((1000, 64, 64), "QYX", False),  # a stack of small planes
    ],
)
def test_the_default_limits_admit_the_largest_normal_requests_at_tile_size_388(
    shape: tuple[int, ...], axes: str, jobs: bool
) -> None:
    work = check_work(header(shape, axes), 4, Settings(), tile_size=388, jobs=jobs)
    assert work.tiles == plan_work(shape[-2], shape[-1], shape[0] if len(shape) == 3 else 1, 388, 4).tiles


def test_a_small_image_passes_at_any_tile_size() -> None:
    """Below 1 MiPx an image counts as 1 MiPx: a tiny request is cheap however it is tiled."""
    settings = Settings()
    for tile in (4, 20, 36):
        work = check_work(header((40, 60)), 4, settings, tile_size=tile)  # admitted: no error
        assert work.tiles == plan_work(40, 60, 1, tile, 4).tiles
    assert work.per_pixel > settings.max_work_per_pixel  # over the ratio by its own pixels: the floor let it in


def test_too_many_tiles_at_a_small_tile_size_gets_422_naming_a_tile_size_and_jobs() -> None:
    with pytest.raises(GeometryError) as e:
        check_work(header((16384, 16384)), 4, Settings(), tile_size=36)
    assert str(e.value) == (
        "at tile_size=36 this 16,384 x 16,384 image needs 262,144 tiles; this server runs at most 4,096 per request "
        "(UNET_MAX_TILES); use tile_size=388 (1,849 tiles), or submit it to POST /jobs (up to 262,144 tiles, "
        "UNET_JOBS_MAX_TILES)"
    )


def test_too_many_tiles_at_every_tile_size_gets_413_pointing_to_jobs() -> None:
    settings = Settings(max_tiles=100)
    with pytest.raises(ImageTooLargeError) as e:
        check_work(header((16384, 16384)), 4, settings, tile_size=388)
    assert str(e.value) == (
        "at tile_size=388 this 16,384 x 16,384 image needs 1,849 tiles; this server runs at most 100 per request "
        "(UNET_MAX_TILES); no tile_size brings it within the limits: send a smaller image, or submit it to "
        "POST /jobs (up to 262,144 tiles, UNET_JOBS_MAX_TILES)"
    )
    with pytest.raises(ImageTooLargeError, match=r"at most 100 per job \(UNET_JOBS_MAX_TILES\).*smaller image$"):
        check_work(header((16384, 16384)), 4, Settings(jobs_max_tiles=100), tile_size=388, jobs=True)


def test_admit_returns_the_header_and_its_tile_count(segmenter: Segmenter) -> None:
    h, codes = parsed(tiff(np.zeros((800, 800), np.uint8), compression="zlib"))
    admitted = admit(h, segmenter, Settings(), output="labels", tile_size=388, compressions=codes)
    assert admitted == Admitted(h, plan_work(800, 800, 1, 388, 4).tiles) and admitted.tiles == 9


def test_admit_gives_the_pixel_limit_the_same_words_as_reading_the_header(segmenter: Segmenter) -> None:
    body = tiff(np.zeros((2, 60, 50), np.uint8))
    h, codes = parsed(body)
    with pytest.raises(ImageTooLargeError) as read:
        read_header(body, max_pixels=5000)
    with pytest.raises(ImageTooLargeError) as admitted:
        admit(h, segmenter, Settings(max_pixels=5000), output="labels", tile_size=388, compressions=codes)
    assert (
        str(admitted.value)
        == str(read.value)
        == ("image declares 6,000 pixels (axes QYX, shape (2, 60, 50)); the limit is 5,000")
    )


def test_admit_refuses_a_decoded_size_over_max_image_mb(segmenter: Segmenter) -> None:
    h, codes = parsed(tiff(np.zeros((1024, 1024), np.float32), compression="zlib"))
    with pytest.raises(ImageTooLargeError) as e:
        admit(h, segmenter, Settings(max_image_mb=2), output="labels", tile_size=388, compressions=codes)
    assert str(e.value) == (
        "image would take 4 MiB decoded (1,048,576 pixels of float32); the limit is 2 MiB (UNET_MAX_IMAGE_MB)"
    )


def test_admit_refuses_a_probabilities_result_over_max_image_mb_and_takes_labels(segmenter: Segmenter) -> None:
    h, codes = parsed(tiff(np.zeros((512, 512), np.uint8)))  # 0.25 MiB decoded; 2 classes of float32: 2 MiB
    settings = Settings(max_image_mb=1)
    with pytest.raises(ImageTooLargeError) as e:
        admit(h, segmenter, settings, output="probabilities", tile_size=388, compressions=codes)
    assert str(e.value) == (
        "the probabilities result would take 2 MiB; the limit is 1 MiB (UNET_MAX_IMAGE_MB); "
        "ask for output=labels or send a smaller image"
    )
    assert admit(h, segmenter, settings, output="labels", tile_size=388, compressions=codes).tiles == 4


def test_admit_refuses_a_codec_whose_decoded_size_the_header_does_not_bound(segmenter: Segmenter) -> None:
    h, codes = parsed(tiff(np.zeros((64, 64), np.uint8), compression="jpeg"))
    with pytest.raises(UnsupportedImageError) as e:
        admit(h, segmenter, Settings(), output="labels", tile_size=388, compressions=codes)
    assert str(e.value) == (
        "compression JPEG is not accepted by the server (its decoded size is not bounded by the TIFF header); "
        "expected one of: Deflate, LZMA, LZW, PackBits, ZSTD, none"
    )


def test_admit_refuses_a_channel_count_the_model_does_not_take(segmenter: Segmenter) -> None:
    h, codes = parsed(tiff(np.zeros((64, 64, 3), np.uint8), photometric="rgb"))
    with pytest.raises(UnsupportedImageError, match=r"^model expects 1 channel\(s\), image has 3"):
        admit(h, segmenter, Settings(), output="labels", tile_size=388, compressions=codes)


@pytest.mark.parametrize(
    ("tile_size", "message"),
    [
        (
            390,
            "invalid tile_size=390: output size 390 is not valid for a depth-4 valid U-Net (sizes are 16k-60 with"
            " k >= 4); nearest valid output sizes: 388 or 404",
        ),
        (
            1428,
            "tile_size 1428 exceeds this server's limit of 1412 (UNET_MAX_TILE_SIZE); the largest valid size allowed"
            " is 1412",
        ),
    ],
)
def test_admit_checks_the_tile_size_first(segmenter: Segmenter, tile_size: int, message: str) -> None:
    h, codes = parsed(
        tiff(np.zeros((64, 64, 3), np.uint8), photometric="rgb", compression="jpeg")
    )  # wrong in two more ways
    with pytest.raises(GeometryError) as e:
        admit(h, segmenter, Settings(max_pixels=10), output="labels", tile_size=tile_size, compressions=codes)
    assert str(e.value) == message


def test_a_job_is_held_to_the_jobs_tile_limit(segmenter: Segmenter) -> None:
    h, codes = parsed(tiff(np.zeros((800, 800), np.uint8)))  # 9 tiles at 388
    settings = Settings(max_tiles=4, jobs_max_tiles=9, jobs_workers=0)
    with pytest.raises(GeometryError, match=r"needs 9 tiles; this server runs at most 4 per request"):
        admit(h, segmenter, settings, output="labels", tile_size=388, compressions=codes)
    assert admit(h, segmenter, settings, output="labels", tile_size=388, compressions=codes, jobs=True).tiles == 9


def test_a_streamed_job_is_held_to_jobs_max_pixels_instead_of_the_in_memory_limits(segmenter: Segmenter) -> None:
    """What ``POST /jobs`` did with ``settings.model_copy(update={"max_pixels": jobs_max_pixels, "max_image_mb": 2**40})``."""
    h, codes = parsed(tiff(np.zeros((1024, 1024), np.float32), compression="zlib"))  # 1 MiPx, 4 MiB decoded
    tight = Settings(max_pixels=1000, max_image_mb=1, jobs_max_pixels=2**20)

    def run(settings: Settings, *, jobs: bool = False, streamed: bool = False) -> Admitted:
        return admit(
            h, segmenter, settings, output="labels", tile_size=388, compressions=codes, jobs=jobs, streamed=streamed
        )

    assert run(tight, jobs=True, streamed=True).tiles == 9
    for jobs, streamed in ((True, False), (False, True), (False, False)):  # an in-memory job; /segment either way
        with pytest.raises(ImageTooLargeError, match=r"the limit is 1,000$"):
            run(tight, jobs=jobs, streamed=streamed)
    with pytest.raises(ImageTooLargeError, match=r"^image would take 4 MiB decoded .* \(UNET_MAX_IMAGE_MB\)$"):
        run(tight.model_copy(update={"max_pixels": 2**20}), jobs=True)  # the same pixels, but held in memory
    with pytest.raises(ImageTooLargeError) as e:
        run(tight.model_copy(update={"jobs_max_pixels": 2**20 - 1}), jobs=True, streamed=True)
    assert str(e.value) == "image declares 1,048,576 pixels (axes YX, shape (1024, 1024)); the limit is 1,048,575"
