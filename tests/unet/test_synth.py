"""The synthetic fluorescence generator: deterministic, exact masks, the domain's traits."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from unet import UNetError
from unet.synth import synth_image, synth_set


def test_a_seed_fixes_the_image_and_mask() -> None:
    a = synth_image(np.random.default_rng([7, 0]), (96, 128))
    b = synth_image(np.random.default_rng([7, 0]), (96, 128))
    c = synth_image(np.random.default_rng([7, 1]), (96, 128))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


def test_image_i_of_a_set_does_not_depend_on_the_set_size() -> None:
    small, large = synth_set(2, seed=3, shape=(64, 64)), synth_set(3, seed=3, shape=(64, 64))
    assert np.array_equal(small[1].image, large[1].image)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_dtype_shape_and_label_ids(dtype: str) -> None:
    s = synth_image(np.random.default_rng(1), (80, 120), dtype=dtype)
    assert s.image.shape == s.labels.shape == (80, 120)
    assert s.image.dtype == np.dtype(dtype) and s.labels.dtype == np.uint16
    ids = np.unique(s.labels)
    assert ids[0] == 0 and set(ids[1:]) <= set(range(1, int(s.params["nuclei"]) + 1))


def test_both_bit_depths_are_drawn() -> None:
    dtypes = {s.image.dtype.name for s in synth_set(12, seed=0, shape=(32, 32))}
    assert dtypes == {"uint8", "uint16"}


def test_in_focus_nuclei_are_brighter_than_their_surroundings() -> None:
    """Each image: nuclei pixels are brighter on average than a ring just outside them."""
    for s in synth_set(8, seed=11, shape=(128, 128)):
        fg = s.labels > 0
        if fg.sum() < 50:
            continue
        ring = ndimage.binary_dilation(fg, iterations=4) & ~ndimage.binary_dilation(fg, iterations=1)
        img = s.image.astype(np.float64)
        assert img[fg].mean() > img[ring].mean()


def test_the_domain_is_randomized_widely() -> None:
    """Scales 0.5x-2x, ghosts, camera offsets and brightness over orders of magnitude all occur."""
    samples = synth_set(24, seed=5, shape=(96, 96))
    scales = [s.params["scale"] for s in samples]
    photons = [s.params["photons_peak"] for s in samples]
    assert min(scales) < 0.8 and max(scales) > 1.3
    assert max(photons) / min(photons) > 10
    assert any(s.params["ghosts"] > 0 for s in samples)
    assert any(s.params["offset"] > 0 and s.image.min() > 0 for s in samples)  # dark pixel is not 0


def test_ghosts_are_not_in_the_mask() -> None:
    """Out-of-focus light adds signal where the mask is 0: background is not flat dark."""
    s = next(x for x in synth_set(20, seed=2, shape=(128, 128)) if x.params["ghosts"] >= 3)
    bg = s.image[s.labels == 0].astype(np.float64)
    assert np.percentile(bg, 99) > np.percentile(bg, 50) + 2 * max(bg.std() * 0.1, 1.0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(UNetError, match="dtype"):
        synth_image(np.random.default_rng(0), (32, 32), dtype="float32")
    with pytest.raises(UNetError, match="shape"):
        synth_image(np.random.default_rng(0), (4, 32))


def test_the_classic_profile_is_the_first_generator_bit_for_bit() -> None:
    """The held-out sets (seeds 1001, 3003) keep their pixels: the sha256 below was taken from
    the generator before the profiles existed."""
    h = hashlib.sha256()
    for i in range(6):
        s = synth_image(np.random.default_rng([1001, i]), (96, 128), profile="classic")
        h.update(s.image.tobytes())
        h.update(s.labels.tobytes())
    assert h.hexdigest() == "8264d167af9cd72b947db94765b74248e33ee08100b63a7fe05711ce3b66ee1b"


def test_the_large_profile_draws_large_nuclei() -> None:
    sizes = []
    for s in synth_set(8, seed=5005, shape=(384, 384), profile="large"):
        area = np.bincount(s.labels.ravel())[1:]
        area = area[area > 0]
        if len(area):
            sizes.append(2 * s.params["mean_radius"])
            assert np.sqrt(4 * area.max() / np.pi) > 40
    assert sizes and all(60 <= d <= 120 for d in sizes)


def test_textured_and_confocal_are_drawn_and_masks_stay_simply_connected() -> None:
    samples = synth_set(12, seed=6006, shape=(256, 256), profile="textured")
    assert all(s.params["textured"] == 1.0 for s in samples)
    assert {s.params["confocal"] for s in samples} == {0.0, 1.0}
    for s in samples:
        for i in range(1, int(s.labels.max()) + 1):
            obj = s.labels == i
            assert not (ndimage.binary_fill_holes(obj) & ~obj).any()


def test_an_unknown_profile_is_refused() -> None:
    with pytest.raises(UNetError, match="unknown synthetic profile"):
        synth_image(np.random.default_rng(0), (32, 32), profile="brightfield")
