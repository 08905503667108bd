"""The paper's loss: pixel-wise cross-entropy weighted to separate touching objects.

Ronneberger et al. (2015), eq. 2::

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

``w_c`` balances the class frequencies; ``d1`` and ``d2`` are the distances to the
border of the nearest and the second-nearest object, so the weight is high on the thin
background gaps between touching objects (w0 = 10, sigma = 5 px) and the network is
pushed hard to keep them. The target's gaps come from :func:`separate_touching`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch.nn import functional

__all__ = [
    "border_weight_map",
    "boundary_target",
    "class_balance_weights",
    "separate_touching",
    "soft_dice_loss",
    "weighted_cross_entropy",
]


def separate_touching(labels: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Binary foreground of an instance image with a background gap between touching instances.

    Where two instances touch, the pixels of the higher id that have a lower-id neighbour
    (8-connected) become background: a one-pixel gap, as in the paper's training masks,
    so the objects stay apart even under 8-connectivity.

    >>> lab = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0]])
    >>> separate_touching(lab)
    array([[1, 1, 0, 1],
           [1, 1, 0, 1],
           [0, 0, 0, 0]], dtype=uint8)
    """
    lab = np.asarray(labels).astype(np.int64)
    masked = np.where(lab > 0, lab, int(lab.max()) + 1)  # background never counts as lower
    lowest_near = np.asarray(ndimage.grey_erosion(masked, size=(3, 3), mode="nearest"))
    return np.asarray((lab > 0) & (lowest_near >= lab), np.uint8)


def boundary_target(labels: npt.NDArray[Any], width: int = 1) -> npt.NDArray[np.uint8]:
    """Three classes from an instance image: 0 background, 1 object, 2 contact boundary.

    ``width`` 1: the boundary class is the gap of :func:`separate_touching`, the contact
    pixels of one of each two touching instances. ``width`` 2r (even): every object pixel
    with another instance within r px (chessboard), on both sides of the contact, so the
    line is 2r px thick and one misread pixel no longer joins two objects. Objects and
    boundaries together are the foreground, so the foreground keeps every object pixel
    while class 1 alone still keeps touching objects apart.

    >>> lab = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0]])
    >>> boundary_target(lab)
    array([[1, 1, 2, 1],
           [1, 1, 2, 1],
           [0, 0, 0, 0]], dtype=uint8)
    >>> boundary_target(lab, width=2)
    array([[1, 2, 2, 1],
           [1, 2, 2, 1],
           [0, 0, 0, 0]], dtype=uint8)
    """
    lab = np.asarray(labels)
    if width == 1:
        apart = separate_touching(lab)
        return np.asarray(np.where((lab > 0) & (apart == 0), 2, apart), np.uint8)
    if width < 1 or width % 2:
        raise ValueError(f"boundary width must be 1 or even, got {width}")
    size = (width + 1, width + 1)
    lab64 = lab.astype(np.int64)
    lowest = np.asarray(ndimage.grey_erosion(np.where(lab64 > 0, lab64, lab64.max() + 1), size=size, mode="nearest"))
    highest = np.asarray(ndimage.grey_dilation(lab64, size=size, mode="nearest"))
    contact = (lab64 > 0) & ((lowest < lab64) | (highest > lab64))
    return np.asarray(np.where(contact, 2, lab64 > 0), np.uint8)


def class_balance_weights(
    target: npt.NDArray[Any], num_classes: int = 2, *, limit: float = 5.0
) -> npt.NDArray[np.float32]:
    """``w_c``: each class weighted by 1 / (K * its frequency), clipped to [1/limit, limit].

    >>> [round(float(v), 3) for v in class_balance_weights(np.array([0, 0, 0, 1]))]
    [0.667, 0.667, 0.667, 2.0]
    """
    t = np.asarray(target)
    counts = np.bincount(t.ravel().astype(np.int64), minlength=num_classes)[:num_classes].astype(np.float64)
    freq = counts / max(float(counts.sum()), 1.0)
    per_class = np.where(freq > 0, 1.0 / (num_classes * np.maximum(freq, 1e-12)), 1.0)
    per_class = np.clip(per_class, 1.0 / limit, limit)
    return np.asarray(per_class[t], np.float32)


def border_weight_map(
    labels: npt.NDArray[Any],
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    num_classes: int = 2,
    target: npt.NDArray[Any] | None = None,
) -> npt.NDArray[np.float32]:
    """The paper's weight map ``w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` for an instance image.

    ``d1``/``d2`` are Euclidean distances to the nearest and second-nearest instance,
    measured only near objects (where the term exceeds ~1e-4 of ``w0``); the border term
    applies to the pixels of ``target`` that are not class 1 (the object): background,
    and the boundary class of :func:`boundary_target` (default target:
    :func:`separate_touching`).

    >>> lab = np.zeros((9, 13), np.int32); lab[2:7, 1:6] = 1; lab[2:7, 7:12] = 2
    >>> w = border_weight_map(lab)
    >>> bool(w[4, 6] == w.max())  # the gap between the two squares
    True
    """
    lab = np.asarray(labels)
    if target is None:
        target = separate_touching(lab)
    weights = class_balance_weights(target, num_classes).astype(np.float64)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if len(ids) < 2 or w0 == 0:
        return weights.astype(np.float32)
    reach = float(sigma * np.sqrt(2 * np.log(1e4)))  # d1 + d2 beyond this adds < 1e-4 * w0
    h, w = lab.shape
    d1 = np.full(lab.shape, np.inf)
    d2 = np.full(lab.shape, np.inf)
    boxes = ndimage.find_objects(lab.astype(np.int64))
    pad = int(np.ceil(reach)) + 1
    for i in ids:
        box = boxes[int(i) - 1]
        if box is None:
            continue
        ys = slice(max(0, box[0].start - pad), min(h, box[0].stop + pad))
        xs = slice(max(0, box[1].start - pad), min(w, box[1].stop + pad))
        local = ndimage.distance_transform_edt(lab[ys, xs] != i)
        cur1, cur2 = d1[ys, xs], d2[ys, xs]
        nearer = local < cur1
        d2[ys, xs] = np.where(nearer, cur1, np.minimum(cur2, local))
        d1[ys, xs] = np.where(nearer, local, cur1)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    weights += np.where(np.asarray(target) != 1, border, 0.0)
    return weights.astype(np.float32)


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``weights * CE`` over pixels, divided by the mean weight (scale-free).

    ``logits`` (B, K, h, w), ``target`` (B, h, w) int64 class ids, ``weights`` (B, h, w).
    """
    ce = functional.cross_entropy(logits, target, reduction="none")  # (B, h, w)
    if weights is None:
        return ce.mean()
    return (ce * weights).sum() / weights.sum().clamp_min(1e-12)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - soft Dice`` of the foreground (every class but 0), pooled over the batch.

    The foreground probability is ``1 - softmax(logits)[:, 0]``; the target's foreground
    is ``target > 0``. Pooling over the whole batch (not per image) keeps patches without
    objects from dominating, and matches the pooled Dice that evaluation reports.

    >>> logits = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]])  # (1, 2, 1, 2): bg, fg
    >>> round(float(soft_dice_loss(logits, torch.tensor([[[0, 1]]]))), 4)
    0.0
    >>> round(float(soft_dice_loss(logits, torch.tensor([[[1, 0]]]))), 4)  # no overlap: 1 - 1/3 (smoothing +1)
    0.6667
    """
    fg = 1.0 - torch.softmax(logits.float(), dim=1)[:, 0]  # (B, h, w)
    t = (target > 0).to(fg.dtype)
    eps = 1.0
    return 1.0 - (2.0 * (fg * t).sum() + eps) / (fg.sum() + t.sum() + eps)
