"""Foreground overlap metrics (Dice and IoU of binary masks) and instance matching (F1 at an
IoU threshold), per image and pooled.

Pure functions on arrays; the ``evaluate`` command runs the model through the same
:class:`~service.segmenter.Segmenter` as serving and scores its masks with these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Matching", "Overlap", "dice", "iou", "match_instances", "overlap"]


@dataclass(frozen=True)
class Overlap:
    """Pixel counts of a predicted against a true foreground mask."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: Overlap) -> Overlap:
        return Overlap(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def dice(self) -> float:
        """2|A∩B| / (|A|+|B|); 1.0 when both masks are empty (nothing to find, nothing found)."""
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom

    @property
    def iou(self) -> float:
        """|A∩B| / |A∪B|; 1.0 when both masks are empty."""
        denom = self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else self.tp / denom


def overlap(predicted: npt.NDArray[Any], truth: npt.NDArray[Any]) -> Overlap:
    """Counts of true positives, false positives and false negatives (non-zero = foreground).

    >>> overlap(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    Overlap(tp=1, fp=1, fn=1)
    """
    p, t = np.asarray(predicted) != 0, np.asarray(truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: predicted {p.shape}, truth {t.shape}")
    tp = int(np.count_nonzero(p & t))
    return Overlap(tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp)


def dice(predicted: npt.NDArray[Any], truth: npt.NDArray[Any]) -> float:
    """Dice coefficient of the foregrounds.

    >>> dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    0.5
    >>> dice(np.zeros(3), np.zeros(3))
    1.0
    """
    return overlap(predicted, truth).dice


def iou(predicted: npt.NDArray[Any], truth: npt.NDArray[Any]) -> float:
    """Intersection over union (Jaccard index) of the foregrounds.

    >>> round(iou(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0])), 4)
    0.3333
    """
    return overlap(predicted, truth).iou


@dataclass(frozen=True)
class Matching:
    """Objects matched one to one at IoU > a threshold (StarDist's and the DSB's count)."""

    tp: int
    fp: int  # predicted objects without a match
    fn: int  # true objects without a match

    def __add__(self, other: Matching) -> Matching:
        return Matching(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN); 1.0 when there is nothing to find and nothing found."""
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2 * self.tp / denom


def match_instances(predicted: npt.NDArray[Any], truth: npt.NDArray[Any], threshold: float = 0.5) -> Matching:
    """Match the objects (non-zero ids) of two instance images at IoU > ``threshold``.

    For a threshold of 0.5 or more a pair above it is unique on both sides, so counting the
    pairs is the one-to-one matching.

    >>> a = np.array([[1, 1, 0, 2], [1, 1, 0, 2]])
    >>> b = np.array([[3, 3, 0, 0], [3, 0, 0, 4]])
    >>> match_instances(a, b)
    Matching(tp=1, fp=1, fn=1)
    """
    if threshold < 0.5:
        raise ValueError("a threshold under 0.5 needs an assignment, not a count of pairs")
    p, t = np.asarray(predicted).astype(np.int64), np.asarray(truth).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: predicted {p.shape}, truth {t.shape}")
    _, p = np.unique(p, return_inverse=True)  # ids 0..n (0 stays background: it is the smallest)
    _, t = np.unique(t, return_inverse=True)
    p, t = p.reshape(predicted.shape), t.reshape(truth.shape)
    if not (np.asarray(predicted) == 0).any():
        p = p + 1
    if not (np.asarray(truth) == 0).any():
        t = t + 1
    n_p, n_t = int(p.max()), int(t.max())
    area_p, area_t = np.bincount(p.ravel(), minlength=n_p + 1), np.bincount(t.ravel(), minlength=n_t + 1)
    both = (p > 0) & (t > 0)
    pairs, inter = np.unique(p[both] * (n_t + 1) + t[both], return_counts=True)
    ip, it = pairs // (n_t + 1), pairs % (n_t + 1)
    iou = inter / (area_p[ip] + area_t[it] - inter)
    tp = int(np.count_nonzero(iou > threshold))
    return Matching(tp, n_p - tp, n_t - tp)
