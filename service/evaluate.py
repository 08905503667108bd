"""Foreground overlap metrics: Dice and IoU of binary masks, per image and pooled.

Pure functions on arrays; the ``evaluate`` command runs the model through the same
:class:`~service.segmenter.Segmenter` as serving and scores its masks with these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Overlap", "dice", "iou", "overlap"]


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
