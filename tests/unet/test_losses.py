"""The paper's border weight map and the weighted cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional

from unet.losses import (
    border_weight_map,
    boundary_target,
    class_balance_weights,
    separate_touching,
    weighted_cross_entropy,
)


def _touching_pair_and_loner() -> np.ndarray:
    lab = np.zeros((60, 90), np.int32)
    lab[10:30, 10:30] = 1
    lab[10:30, 31:51] = 2  # one pixel of background between 1 and 2
    lab[40:55, 70:85] = 3  # far from the others
    return lab


def test_weights_peak_in_the_gap_between_touching_objects() -> None:
    lab = _touching_pair_and_loner()
    w = border_weight_map(lab)
    gap = w[10:30, 30]
    assert np.unravel_index(np.argmax(w), w.shape)[1] == 30  # the maximum lies on the gap column
    assert gap.min() > 0.9 * 10  # w0 = 10 added almost fully: d1 + d2 = 2 px there
    far_background = w[0, 89]
    assert far_background < 1.0  # only the class weight far from objects
    # beside the lonely object the border term is small: d2 is large there
    assert w[47, 68] < w[20, 30] / 3


def test_weight_falls_off_with_the_gap_width() -> None:
    def gap_weight(gap: int) -> float:
        lab = np.zeros((40, 80), np.int32)
        lab[10:30, 10:30] = 1
        lab[10:30, 30 + gap : 50 + gap] = 2
        return float(border_weight_map(lab, w0=10.0, sigma=5.0)[20, 30 + gap // 2])

    assert gap_weight(2) > gap_weight(6) > gap_weight(12)


def test_class_weights_balance_the_classes() -> None:
    target = np.zeros((50, 50), np.uint8)
    target[:20, :25] = 1  # 20 % foreground
    wc = class_balance_weights(target)
    assert np.isclose(wc[target == 1].sum(), wc[target == 0].sum(), rtol=1e-5)
    assert np.isclose(wc.mean(), 1.0, rtol=1e-5)
    target[:] = 0
    target[:5, :5] = 1  # 1 %: the foreground weight would be 50, it is clipped
    assert class_balance_weights(target, limit=5.0).max() == 5.0


def test_separate_touching_disconnects_instances_and_keeps_loners() -> None:
    lab = np.zeros((40, 60), np.int32)
    lab[5:25, 5:25] = 1
    lab[5:25, 25:45] = 2  # touching 1
    lab[30:38, 50:58] = 3
    fg = separate_touching(lab)
    _, n = ndimage.label(fg, structure=np.ones((3, 3)))
    assert n == 3
    assert np.array_equal(fg[lab == 3], np.ones(64, np.uint8))  # untouched object intact
    assert fg[lab == 1].all()  # the lower id keeps its pixels; only a one-pixel gap is cut
    assert (fg[lab == 2] == 0).sum() == 20


def test_weighted_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    target = torch.randint(0, 2, (2, 8, 8))
    ones = torch.ones(2, 8, 8)
    assert torch.allclose(weighted_cross_entropy(logits, target, ones), functional.cross_entropy(logits, target))
    assert torch.allclose(weighted_cross_entropy(logits, target, 3 * ones), functional.cross_entropy(logits, target))
    ce = functional.cross_entropy(logits, target, reduction="none")
    worst = ce.flatten().argmax()
    w = ones.clone().flatten()
    w[worst] = 10.0
    assert weighted_cross_entropy(logits, target, w.view(2, 8, 8)) > functional.cross_entropy(logits, target)


def test_boundary_target_keeps_every_object_pixel_and_marks_the_contact() -> None:
    lab = np.zeros((40, 60), np.int32)
    lab[5:25, 5:25] = 1
    lab[5:25, 25:45] = 2  # touching 1 along a straight edge
    lab[30:38, 50:58] = 3
    target = boundary_target(lab)
    assert np.array_equal(target > 0, lab > 0)  # foreground (classes 1 and 2) = every object pixel
    assert np.array_equal(target == 1, separate_touching(lab) == 1)  # class 1 alone keeps objects apart
    assert np.array_equal(np.argwhere(target == 2)[:, 1], np.full(20, 25))  # the contact column of object 2
    assert (target[30:38, 50:58] == 1).all()  # a loner has no boundary


def test_border_weights_fall_on_the_boundary_class() -> None:
    lab = _touching_pair_and_loner()
    lab[10:30, 30] = 1  # close the gap: the two objects touch
    target = boundary_target(lab)
    w = border_weight_map(lab, num_classes=3, target=target)
    contact = target == 2
    assert contact.any() and w[contact].min() > 10  # class weight plus almost all of w0
    assert w[target == 1].max() <= 5.0  # object pixels carry only their class weight
