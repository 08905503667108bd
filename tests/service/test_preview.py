"""The preview pyramid: what each level holds, outlines where the mask's borders are, the
overview's size, and memory that does not grow with the image."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
from scipy import ndimage

from service.errors import InputError, TileNotFoundError
from service.preview import OUTLINE, TILE, Preview, PreviewWriter, level_shapes
from unet import ChannelAffine

AFFINE = ChannelAffine((1 / 3000,), (-100 / 3000,), low=(100.0,), high=(3100.0,))
CROSS = ndimage.generate_binary_structure(2, 1)


def scene(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint16 intensities and 3-class labels (0 background, 1 nucleus, 2 boundary): discs
    with a ring, some touching, some over the image's edge."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(max(4, h * w // 4000)):
        cy, cx, r = rng.integers(-10, h + 10), rng.integers(-10, w + 10), rng.integers(6, 30)
        d = np.hypot(yy - cy, xx - cx)
        labels[d < r] = 1
        labels[(d >= r) & (d < r + 2)] = 2
    raw = (rng.normal(500, 50, shape) + 2000 * (labels > 0)).clip(0, 65535).astype(np.uint16)
    return raw, labels


def write(
    path: Path,
    raw: np.ndarray,
    values: np.ndarray,
    bands: list[int],
    *,
    classes: Any = ("bg", "nucleus", "boundary"),
    **kw: Any,
) -> Preview:
    writer = PreviewWriter(path, values.shape, 1, classes=classes, **kw)
    writer.normalized(AFFINE)
    y = 0
    for n in bands:
        writer.add(values[y : y + n], y, raw[np.newaxis, y : y + n])
        y += n
    assert y == values.shape[0]
    writer.finish()
    return Preview(path)


def level(preview: Preview, k: int) -> np.ndarray:
    """Level ``k`` assembled from its chunks: (2, h, w), display image then code."""
    info = preview.levels[k]
    out = np.zeros((2, *info["shape"]), np.uint8)
    ny, nx = info["grid"]
    for ty in range(ny):
        for tx in range(nx):
            c = preview.chunk(k, ty, tx)
            out[:, ty * TILE : ty * TILE + c.shape[1], tx * TILE : tx * TILE + c.shape[2]] = c
    return out


def reference_outlines(values: np.ndarray, background: int) -> np.ndarray:
    """Object pixels whose 4-neighbourhood holds another value (image edges draw no line)."""
    lo = ndimage.minimum_filter(values, footprint=CROSS, mode="nearest")
    hi = ndimage.maximum_filter(values, footprint=CROSS, mode="nearest")
    return (lo != hi) & (values != background)


def test_levels_hold_the_stretched_image_and_every_2k_th_label(tmp_path: Path) -> None:
    raw, labels = scene((700, 530))
    preview = write(tmp_path / "p.bin", raw, labels, [97] * 7 + [21])
    assert (
        [tuple(lv["shape"]) for lv in preview.levels] == level_shapes(700, 530) == [(700, 530), (350, 265), (175, 133)]
    )
    base = level(preview, 0)
    expected = np.floor(AFFINE.stretch(raw[np.newaxis].astype(np.float32))[0] * 255 + 0.5).astype(np.uint8)
    assert np.abs(base[0].astype(int) - expected).max() <= 1  # the stretched input, to rounding
    for k in range(3):
        got = level(preview, k)
        f = 2**k
        np.testing.assert_array_equal(got[1] & 0x7F, labels[::f, ::f])
        if k:  # 2 x 2 means of the level above, rounded
            above = level(preview, k - 1)[0].astype(np.float64)
            above = np.pad(above, ((0, above.shape[0] % 2), (0, above.shape[1] % 2)), mode="edge")
            means = above.reshape(got.shape[1], 2, got.shape[2], 2).mean(axis=(1, 3))
            np.testing.assert_array_equal(got[0], np.floor(means + 0.5).astype(np.uint8))


@pytest.mark.parametrize("kind", ["labels", "instances"])
def test_outlines_are_where_the_masks_borders_are_at_every_level(tmp_path: Path, kind: str) -> None:
    raw, labels = scene((600, 800), seed=1)
    if kind == "instances":  # touching objects get different ids: the line between them is drawn
        values = ndimage.label(labels == 1)[0].astype(np.uint32)
        preview = write(tmp_path / "p.bin", raw, values, [388, 212], classes=None)
    else:
        values = labels
        preview = write(tmp_path / "p.bin", raw, values, [388, 212])
    for k, _ in enumerate(preview.levels):
        f = 2**k
        got = (level(preview, k)[1] & OUTLINE) != 0
        np.testing.assert_array_equal(got, reference_outlines(values[::f, ::f], 0))


def test_touching_instances_are_parted_by_their_outlines(tmp_path: Path) -> None:
    values = np.zeros((40, 60), np.uint32)
    values[10:30, 10:30], values[10:30, 30:50] = 7, 8  # two squares sharing the column edge 29 | 30
    preview = write(tmp_path / "p.bin", np.zeros((40, 60), np.uint16), values, [40], classes=None)
    code = level(preview, 0)[1]
    assert ((code & 0x7F) == (values > 0)).all()  # every object is class 1 ("object")
    outline = (code & OUTLINE) != 0
    assert outline[11:29, 29].all() and outline[11:29, 30].all()  # the shared edge, on both sides
    assert not outline[11:29, 11:29].any() and not outline[11:29, 31:49].any()  # inside: nothing


def test_bands_of_any_height_give_the_same_file(tmp_path: Path) -> None:
    raw, labels = scene((900, 300), seed=2)
    one = write(tmp_path / "one.bin", raw, labels, [900])
    many = write(tmp_path / "many.bin", raw, labels, [1, 255, 1, 256, 257, 100, 30])
    for k in range(len(one.levels)):
        np.testing.assert_array_equal(level(one, k), level(many, k))


def test_tiles_and_overview(tmp_path: Path) -> None:
    raw, labels = scene((1300, 2100), seed=3)
    preview = write(tmp_path / "p.bin", raw, labels, [388, 388, 388, 136])
    described = preview.describe()
    assert (described["width"], described["height"], described["tile"]) == (2100, 1300, TILE)
    assert [c["rgb"] for c in described["classes"]] == [None, [230, 25, 75], [60, 180, 75]]
    rgb = imagecodecs.png_decode(preview.tile(0, 1, 2, "image"))
    rgba = imagecodecs.png_decode(preview.tile(0, 1, 2, "outline"))
    assert rgb.shape == (TILE, TILE, 3) and rgba.shape == (TILE, TILE, 4)
    edge = imagecodecs.png_decode(preview.tile(0, 5, 8))  # the last tile is cut to the image
    assert edge.shape == (1300 - 5 * TILE, 2100 - 8 * TILE, 3)
    code = preview.chunk(0, 1, 2)[1]
    np.testing.assert_array_equal(rgba[..., 3] == 255, (code & OUTLINE) != 0)
    for size in (256, 1024, 4096):
        png = imagecodecs.png_decode(preview.overview(size))
        assert max(png.shape[:2]) <= size and (max(png.shape[:2]) > size // 2 or size > 2100)
        k = int(np.log2(2100 / png.shape[1]) + 0.5)
        outline = (level(preview, k)[1] & OUTLINE) != 0
        grey = (png[..., 0] == png[..., 1]) & (png[..., 1] == png[..., 2])
        assert outline.any() and not grey[outline].any()  # every outline pixel coloured
        assert grey[~outline].all()  # the rest is the image, in grey
    with pytest.raises(TileNotFoundError, match="no tile 6/0 at level 0"):
        preview.tile(0, 6, 0)
    with pytest.raises(TileNotFoundError, match="no level 9"):
        preview.tile(9, 0, 0)


def test_an_incomplete_preview_leaves_nothing(tmp_path: Path) -> None:
    raw, labels = scene((500, 300))
    writer = PreviewWriter(tmp_path / "p.bin", labels.shape, 1, classes=("a", "b", "c"))
    writer.normalized(AFFINE)
    writer.add(labels[:200], 0, raw[np.newaxis, :200])
    with pytest.raises(RuntimeError, match="got 200 of 500 rows"):
        writer.finish()
    assert list(tmp_path.iterdir()) == []
    writer = PreviewWriter(tmp_path / "p.bin", labels.shape, 1, classes=("a", "b", "c"))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_only_levels_up_to_max_edge_are_stored(tmp_path: Path) -> None:
    raw, labels = scene((1000, 1000))
    preview = write(tmp_path / "p.bin", raw, labels, [1000], max_edge=300)
    assert [lv["level"] for lv in preview.describe()["levels"]] == [2]
    assert imagecodecs.png_decode(preview.overview(1024)).shape == (250, 250, 3)
    with pytest.raises(TileNotFoundError, match=r"levels are 2\.\.2"):
        preview.tile(0, 0, 0)


@pytest.mark.slow
def test_memory_stays_bounded_on_32768_squared(tmp_path: Path) -> None:
    """A 32768 x 32768 plane (1 G px: 2 GiB of uint16 input, 1 GiB of labels) in bands of 388
    rows, as the engine hands them over: the writer's own allocations stay a few bands."""
    side, rows = 32768, 388
    rng = np.random.default_rng(0)
    pattern = (rng.random((rows + 64, side)) < 0.3).astype(np.uint8)  # reused: the test's own memory stays small
    raw = pattern.astype(np.uint16) * 2000 + 300
    writer = PreviewWriter(tmp_path / "p.bin", (side, side), 1, classes=("bg", "fg"))
    writer.normalized(AFFINE)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for y0 in range(0, side, rows):
            n = min(rows, side - y0)
            s = y0 % 64
            writer.add(pattern[s : s + n], y0, raw[np.newaxis, s : s + n])
        writer.finish()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    band = rows * side  # 12.7 MB of uint8 labels
    assert peak < 8 * band, f"peak {peak / 2**20:.0f} MiB for bands of {band / 2**20:.0f} MiB"
    preview = Preview(tmp_path / "p.bin")
    tracemalloc.start()
    try:
        png = preview.overview(1024)
        tile = preview.tile(0, 127, 127)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert imagecodecs.png_decode(png).shape == (1024, 1024, 3) and imagecodecs.png_decode(tile).shape == (256, 256, 3)
    assert peak < 64 << 20, f"overview peak {peak / 2**20:.0f} MiB"


def test_a_file_that_is_not_a_preview_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"not a preview at all")
    with pytest.raises(InputError, match=r"^not a preview file: junk\.bin$"):
        Preview(tmp_path / "junk.bin")
    (tmp_path / "tiny.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=r"^unreadable preview tiny\.bin"):
        Preview(tmp_path / "tiny.bin")
