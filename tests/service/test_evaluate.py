"""Dice and IoU on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest

from service.evaluate import Overlap, dice, iou, overlap


def test_identical_masks_score_one() -> None:
    m = np.zeros((10, 10), np.uint8)
    m[2:6, 3:8] = 1
    assert dice(m, m) == 1.0 and iou(m, m) == 1.0


def test_disjoint_masks_score_zero() -> None:
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[:2], b[2:] = True, True
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0


def test_half_overlapping_squares() -> None:
    """Two 4x4 squares shifted by 2 px: |A∩B| = 8, |A| = |B| = 16, |A∪B| = 24."""
    a, b = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    a[0:4, 0:4] = 1
    b[0:4, 2:6] = 1
    assert overlap(a, b) == Overlap(tp=8, fp=8, fn=8)
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(1 / 3)


def test_any_nonzero_label_is_foreground() -> None:
    """Instance masks (ids 1..n) and 0/255 masks compare as foreground/background."""
    truth = np.array([[0, 3, 3, 7]], np.uint16)
    pred = np.array([[0, 255, 0, 255]], np.uint8)
    assert overlap(pred, truth) == Overlap(tp=2, fp=0, fn=1)
    assert dice(pred, truth) == pytest.approx(0.8)
    assert iou(pred, truth) == pytest.approx(2 / 3)


def test_empty_masks_agree_perfectly_and_a_miss_scores_zero() -> None:
    empty = np.zeros((3, 3), np.uint8)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    full = np.ones((3, 3), np.uint8)
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0


def test_pooling_adds_counts_not_scores() -> None:
    """Overall Dice pools pixels: a big perfect image outweighs a small poor one."""
    big = overlap(np.ones(100), np.ones(100))
    small = overlap(np.array([1, 0]), np.array([0, 1]))
    pooled = big + small
    assert pooled == Overlap(tp=100, fp=1, fn=1)
    assert pooled.dice == pytest.approx(200 / 202)
    assert (big.dice + small.dice) / 2 == 0.5


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
