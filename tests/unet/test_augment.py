"""Augmentation: one coordinate map warps image, mask and weights alike."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from unet.augment import (
    Warp,
    elastic_displacement,
    intensity_jitter,
    random_warp,
    sample_patch,
    warp_coordinates,
)


def _blobs(shape: tuple[int, int] = (160, 160), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An instance image of discs and an image that is 1 inside them, 0 outside."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for i in range(1, 13):
        cy, cx, r = rng.uniform(15, shape[0] - 15), rng.uniform(15, shape[1] - 15), rng.uniform(5, 12)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (labels == 0)] = i
    return labels, (labels > 0).astype(np.float32)


def test_identity_warp_reads_the_window_unchanged() -> None:
    labels, image = _blobs()
    image = image + np.random.default_rng(1).normal(0, 0.1, image.shape).astype(np.float32)
    coords = warp_coordinates(Warp(0.0, 1.0, False, None), (41, 41), (60.0, 70.0))
    img, mask, _ = sample_patch(coords, image, mask=labels)
    assert np.allclose(img, image[40:81, 50:91], atol=1e-4)
    assert mask is not None and np.array_equal(mask, labels[40:81, 50:91])


def test_elastic_field_is_smooth_and_scaled_by_sigma() -> None:
    d = elastic_displacement(np.random.default_rng(0), (120, 120), sigma=10.0)
    assert d.shape == (2, 120, 120)
    assert 1.0 < np.abs(d).max() < 60.0
    assert np.abs(np.diff(d, axis=1)).max() < 2.0  # neighbouring pixels move together
    small = elastic_displacement(np.random.default_rng(0), (120, 120), sigma=1.0)
    assert np.allclose(small * 10, d)


def test_deformed_mask_matches_the_deformed_image() -> None:
    """The same field on image (cubic) and mask (nearest): objects coincide after warping."""
    labels, image = _blobs()
    rng = np.random.default_rng(3)
    for _ in range(5):
        warp = random_warp(rng, (140, 140), elastic_sigma=10.0, elastic_prob=1.0)
        coords = warp_coordinates(warp, (140, 140), (80.0, 80.0))
        img, mask, _ = sample_patch(coords, image, mask=labels)
        assert mask is not None
        from_image, from_mask = img > 0.5, mask > 0
        agree = (from_image == from_mask).mean()
        assert agree > 0.99
        # each warped object sits where the image shows it (centroids within a pixel)
        for i in np.unique(mask[mask > 0]):
            obj = mask == i
            if obj.sum() < 30:
                continue
            cy, cx = ndimage.center_of_mass(obj)
            iy, ix = ndimage.center_of_mass(img * obj)
            assert abs(cy - iy) < 1.0 and abs(cx - ix) < 1.0
        # a mask warped with another field does not match: the check has teeth
        other = warp_coordinates(random_warp(rng, (140, 140), elastic_prob=1.0), (140, 140), (80.0, 80.0))
        _, wrong, _ = sample_patch(other, image, mask=labels)
        assert wrong is not None and ((wrong > 0) == from_image).mean() < agree - 0.02


def test_mask_and_weights_are_cropped_to_the_output() -> None:
    labels, image = _blobs()
    weights = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    warp = random_warp(np.random.default_rng(4), (100, 100))
    coords = warp_coordinates(warp, (100, 100), (80.0, 80.0))
    _, full, wfull = sample_patch(coords, image, mask=labels, weights=weights)
    img, cropped, wcrop = sample_patch(coords, image, mask=labels, weights=weights, crop=30)
    assert img.shape == (100, 100)
    assert cropped is not None and full is not None and cropped.shape == (40, 40)
    assert np.array_equal(cropped, full[30:70, 30:70])
    assert wcrop is not None and wfull is not None and np.allclose(wcrop, wfull[30:70, 30:70])
    assert cropped.dtype == labels.dtype  # labels stay labels (nearest neighbour)
    assert set(np.unique(cropped)) <= set(np.unique(labels))


def test_flip_and_rotation_keep_the_patch_centre() -> None:
    coords = warp_coordinates(Warp(np.pi / 2, 1.0, True, None), (5, 5), (20.0, 30.0))
    assert np.allclose(coords[:, 2, 2], [20.0, 30.0])
    assert np.allclose(sorted(coords[0].ravel()), sorted(np.repeat(np.arange(18.0, 23.0), 5)))


def test_intensity_jitter_is_seeded_and_keeps_shape() -> None:
    x = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    a = intensity_jitter(np.random.default_rng(5), x)
    b = intensity_jitter(np.random.default_rng(5), x)
    assert a.dtype == np.float32 and a.shape == x.shape and np.array_equal(a, b)
    assert not np.array_equal(a, x)
