"""Instances from a class mask: the rule on the whole mask, and the same ids from any bands."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from tiling.instances import InstanceLabeller, InstanceRule, Spool, label_instances

DEMO = InstanceRule(seeds=(1,), grow=(2,), min_area=4, grow_px=3)


def banded(mask: np.ndarray, rule: InstanceRule, cuts: list[int], spool_dir=None) -> tuple[int, np.ndarray]:
    """The labeller fed ``mask`` cut into bands at ``cuts``."""
    spool = Spool(mask.shape[1], spool_dir)
    lab = InstanceLabeller(mask.shape, rule, spool)
    edges = [0, *sorted(set(c for c in cuts if 0 < c < mask.shape[0])), mask.shape[0]]
    for a, b in itertools.pairwise(edges):
        lab.add(mask[a:b])
    relabel = lab.finish()
    out = np.concatenate([band for _, band in relabel.bands()])
    spool.close()
    return relabel.count, out


def random_mask(rng: np.random.Generator, shape: tuple[int, int], classes: int = 3) -> np.ndarray:
    """Blobs of class 1 with class-2 rims where blobs meet, and some class-2 specks."""
    noise = ndimage.gaussian_filter(rng.random(shape), 1.5)
    fg = noise > np.quantile(noise, 0.45)
    seeds, _ = ndimage.label(fg & (noise > np.quantile(noise, 0.7)))
    grown = ndimage.grey_dilation(seeds, size=(3, 3))
    mask = np.where(fg, 1, 0).astype(np.uint8)
    if classes == 3:
        contact = (ndimage.grey_erosion(np.where(grown > 0, grown, 1 << 20), size=(3, 3)) != grown) & (grown > 0)
        mask[fg & contact] = 2
        mask[rng.random(shape) < 0.01] = 2
    return mask


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    cuts=st.lists(st.integers(1, 39), max_size=6),
    min_area=st.sampled_from([0, 1, 5, 12]),
    grow_px=st.sampled_from([0, 1, 2, 5]),
    fill=st.booleans(),
)
def test_any_bands_give_the_whole_mask_ids(seed, h, w, cuts, min_area, grow_px, fill):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, (h, w))
    rule = InstanceRule(seeds=(1,), grow=(2,), min_area=min_area, grow_px=grow_px, fill_holes=fill)
    whole = label_instances(mask, rule)
    count, out = banded(mask, rule, cuts)
    np.testing.assert_array_equal(out, whole)
    assert count == int(whole.max())


def test_canonical_ids_number_objects_in_raster_order_of_their_first_pixel():
    rng = np.random.default_rng(7)
    mask = random_mask(rng, (120, 90))
    ids = label_instances(mask, DEMO)
    values, first = np.unique(ids.ravel(), return_index=True)
    assert values[0] == 0 and np.all(np.diff(first[1:]) > 0)  # id k+1 starts after id k
    assert values.tolist() == list(range(int(ids.max()) + 1))


def test_an_object_over_a_seam_stays_whole(tmp_path):
    mask = np.zeros((64, 50), np.uint8)
    yy, xx = np.mgrid[:64, :50]
    mask[(yy - 32) ** 2 + (xx - 25) ** 2 < 15**2] = 1
    for cuts in ([32], [31], [33], list(range(1, 64))):  # a seam through it, and one per row
        count, out = banded(mask, DEMO, cuts, tmp_path)
        assert count == 1
        np.testing.assert_array_equal(out > 0, mask > 0)
    assert not list(tmp_path.iterdir())  # the spool file is gone


def test_a_long_diagonal_object_over_many_bands_is_one_object():
    n = 300
    mask = np.zeros((n, n), np.uint8)
    for d in range(-1, 2):  # a 3-px wide diagonal line, 4-connected
        idx = np.arange(max(0, -d), min(n, n - d))
        mask[idx, idx + d] = 1
    count, out = banded(mask, DEMO, list(range(7, n, 7)))
    assert count == 1 and set(np.unique(out)) == {0, 1}
    # a U: two arms that meet only at the bottom, many bands later, are one object, id 1
    u = np.zeros((200, 30), np.uint8)
    u[:, 2:6] = u[:, 20:24] = 1
    u[190:195, 2:24] = 1
    count, out = banded(u, DEMO, list(range(5, 200, 9)))
    assert count == 1 and out[0, 3] == out[0, 21] == 1


def test_touching_nuclei_are_separated_by_their_boundary_class():
    mask = np.zeros((30, 40), np.uint8)
    yy, xx = np.mgrid[:30, :40]
    a = (yy - 15) ** 2 + (xx - 11) ** 2 < 81
    b = (yy - 15) ** 2 + (xx - 28) ** 2 < 81
    mask[a | b] = 1
    mask[(a | b) & (np.abs(xx - 19.5) < 1.5)] = 2  # their contact line
    ids = label_instances(mask, DEMO)
    assert ids.max() == 2
    np.testing.assert_array_equal(ids > 0, a | b)  # the boundary pixels are given back to the two
    assert set(np.unique(ids[:, :18])) <= {0, 1} and set(np.unique(ids[:, 22:])) <= {0, 2}
    # without the boundary class the two are one object (what a 2-class model gets: components)
    assert label_instances((mask > 0).astype(np.uint8), InstanceRule()).max() == 1


def test_holes_fill_small_fragments_drop_and_unreached_boundary_is_background():
    mask = np.zeros((30, 30), np.uint8)
    mask[5:20, 5:20] = 1
    mask[9:13, 9:13] = 0  # a hole
    mask[15, 15] = 2  # a boundary speck inside: reached and taken
    mask[25:27, 25:27] = 1  # a 4-px fragment
    mask[2, 25] = 2  # boundary far from any nucleus
    rule = InstanceRule(seeds=(1,), grow=(2,), min_area=5, grow_px=2)
    ids = label_instances(mask, rule)
    assert ids.max() == 1
    assert ids[10, 10] == 1 and ids[15, 15] == 1  # the hole filled
    assert ids[25, 25] == 0 and ids[2, 25] == 0
    assert (ids == 1).sum() == 15 * 15
    # a hole that touches two objects is not a hole of either; one at the border is not a hole
    two = np.zeros((12, 12), np.uint8)
    two[2:10, 2:6] = two[2:10, 7:11] = 1
    two[2, 6] = two[9, 6] = 2
    assert (label_instances(two, InstanceRule(seeds=(1,), grow=(2,)))[3:9, 6] == 0).all()
    edge = np.zeros((8, 8), np.uint8)
    edge[0:6, 0:6] = 1
    edge[0:2, 2:4] = 0
    assert (label_instances(edge, InstanceRule())[0:2, 2:4] == 0).all()


def test_a_fragment_dropped_inside_a_nucleus_leaves_no_hole():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:18, 2:18] = 1
    mask[6:12, 6:12] = 0
    mask[8:10, 8:10] = 1  # a 4-px island inside the hole: dropped, then the hole is filled
    ids = label_instances(mask, InstanceRule(min_area=5))
    assert ids.max() == 1 and (ids[2:18, 2:18] == 1).all()
    count, out = banded(mask, InstanceRule(min_area=5), [7, 9, 11])
    assert count == 1
    np.testing.assert_array_equal(out, ids)


def test_components_match_scipy_for_a_two_class_mask():
    rng = np.random.default_rng(3)
    mask = (ndimage.gaussian_filter(rng.random((80, 70)), 2) > 0.5).astype(np.uint8)
    ids = label_instances(mask, InstanceRule(fill_holes=False))
    ref, n = ndimage.label(mask)
    assert ids.max() == n
    # the same partition: one-to-one between our ids and scipy's
    pairs = np.unique(np.stack([ids.ravel(), ref.ravel()]), axis=1)
    assert pairs.shape[1] == n + 1


def test_rule_checks_and_round_trip():
    rule = InstanceRule(seeds=(1,), grow=(2,), min_area=10)
    assert InstanceRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="overlap"):
        InstanceRule(seeds=(1,), grow=(1,))
    with pytest.raises(ValueError, match="unknown"):
        InstanceRule.from_dict({"seeds": [1], "colour": 3})


def test_the_labeller_refuses_wrong_bands():
    lab = InstanceLabeller((4, 5), InstanceRule())
    with pytest.raises(ValueError, match="width"):
        lab.add(np.zeros((2, 4), np.uint8))
    lab.add(np.zeros((2, 5), np.uint8))
    with pytest.raises(ValueError, match="rows"):
        lab.finish()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    h=st.integers(1, 30),
    w=st.integers(1, 30),
    density=st.floats(0.2, 0.8),
    cuts=st.lists(st.integers(1, 29), max_size=8),
    min_area=st.sampled_from([0, 2, 4, 9]),
)
def test_salt_and_pepper_masks_too(seed, h, w, density, cuts, min_area):
    """Pixel noise: fragments dropped inside holes, holes that touch two objects, pinches."""
    rng = np.random.default_rng(seed)
    fg = rng.random((h, w)) < density
    mask = np.where(fg, np.where(rng.random((h, w)) < 0.3, 2, 1), 0).astype(np.uint8)
    rule = InstanceRule(seeds=(1,), grow=(2,), min_area=min_area, grow_px=2)
    count, out = banded(mask, rule, cuts)
    assert count == int(out.max())
    np.testing.assert_array_equal(out, label_instances(mask, rule))
