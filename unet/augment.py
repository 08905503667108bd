"""Training augmentation: one geometric warp applied identically to image, mask and weights.

Geometry is a single coordinate map per patch: the paper's elastic deformation (random
displacement vectors on a coarse 3x3 grid, drawn from a Gaussian with ``sigma`` px and
upsampled with bicubic interpolation to a smooth per-pixel field), composed with a
random rotation, scaling and flips. The image is resampled from that map with cubic
interpolation, the mask with nearest neighbour (``order=0``: labels stay labels) and the
loss weights linearly, all with the same coordinates, so they stay aligned. Outside the
source the map mirrors (``mode="mirror"``: the edge pixel is not repeated), as the
tiling engine pads at inference.

Intensity jitter (contrast, brightness, gamma, noise) acts on the normalized image only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = [
    "Warp",
    "elastic_displacement",
    "intensity_jitter",
    "random_warp",
    "sample_patch",
    "warp_coordinates",
]


def elastic_displacement(
    rng: np.random.Generator, shape: tuple[int, int], *, sigma: float = 10.0, grid: int = 3
) -> npt.NDArray[np.float64]:
    """A smooth (2, H, W) displacement field: N(0, sigma) vectors on a ``grid x grid``
    lattice spanning the patch, upsampled bicubically (the paper's elastic deformation).

    >>> d = elastic_displacement(np.random.default_rng(0), (50, 60))
    >>> d.shape
    (2, 50, 60)
    >>> bool(elastic_displacement(np.random.default_rng(0), (8, 8), sigma=0.0).any())
    False
    """
    coarse = rng.normal(0.0, sigma, (2, grid, grid))
    h, w = shape
    # coordinates of every pixel in the coarse lattice's index space (corners at 0 and grid-1)
    gy = np.linspace(0.0, grid - 1.0, h)
    gx = np.linspace(0.0, grid - 1.0, w)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    return np.stack([ndimage.map_coordinates(c, [yy, xx], order=3, mode="nearest", prefilter=True) for c in coarse])


@dataclass(frozen=True)
class Warp:
    """A random geometric transform of a patch: where each patch pixel reads from."""

    angle: float  # radians
    scale: float  # > 1 zooms in (objects look bigger)
    flip: bool  # mirror the patch's x axis
    displacement: npt.NDArray[np.float64] | None  # (2, h, w) elastic field in px, or None


def random_warp(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    elastic_sigma: float = 10.0,
    scale_range: tuple[float, float] = (0.75, 1.33),
    elastic_prob: float = 0.8,
) -> Warp:
    """Any rotation, a log-uniform zoom in ``scale_range``, a flip, and (usually) an elastic field."""
    lo, hi = scale_range
    displacement = (
        elastic_displacement(rng, shape, sigma=float(rng.uniform(0.0, elastic_sigma)))
        if rng.random() < elastic_prob
        else None
    )
    return Warp(
        angle=float(rng.uniform(0.0, 2 * np.pi)),
        scale=float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
        flip=bool(rng.random() < 0.5),
        displacement=displacement,
    )


def warp_coordinates(warp: Warp, shape: tuple[int, int], center: tuple[float, float]) -> npt.NDArray[np.float64]:
    """(2, h, w) source coordinates for a patch of ``shape`` centred on ``center`` of the source.

    >>> c = warp_coordinates(Warp(0.0, 1.0, False, None), (3, 3), (10.0, 20.0))
    >>> c[:, 1, 1].tolist(), c[:, 0, 0].tolist()
    ([10.0, 20.0], [9.0, 19.0])
    """
    h, w = shape
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    if warp.flip:
        xx = -xx
    cos, sin = np.cos(warp.angle) / warp.scale, np.sin(warp.angle) / warp.scale
    sy = cos * yy - sin * xx
    sx = sin * yy + cos * xx
    if warp.displacement is not None:
        sy = sy + warp.displacement[0]
        sx = sx + warp.displacement[1]
    return np.stack([sy + center[0], sx + center[1]])


def sample_patch(
    coords: npt.NDArray[np.float64],
    image: npt.NDArray[Any],
    *,
    mask: npt.NDArray[Any] | None = None,
    weights: npt.NDArray[Any] | None = None,
    crop: int = 0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any] | None, npt.NDArray[np.float32] | None]:
    """Resample image (cubic), mask (nearest) and weights (linear) at ``coords``.

    ``crop``: pixels trimmed from each side of the mask and weights, so that they cover
    only the network's output (the valid U-Net's margin), as in the paper.
    """
    sl = (slice(crop, coords.shape[1] - crop), slice(crop, coords.shape[2] - crop))
    out_img = ndimage.map_coordinates(image.astype(np.float32, copy=False), coords, order=3, mode="mirror")
    inner = coords[(slice(None), *sl)]
    out_mask = None if mask is None else ndimage.map_coordinates(mask, inner, order=0, mode="mirror")
    out_w = None
    if weights is not None:
        out_w = ndimage.map_coordinates(weights.astype(np.float32, copy=False), inner, order=1, mode="mirror")
    return out_img.astype(np.float32, copy=False), out_mask, out_w


def intensity_jitter(
    rng: np.random.Generator, x: npt.NDArray[np.float32], *, strength: float = 1.0
) -> npt.NDArray[np.float32]:
    """Random contrast, brightness, gamma and additive noise on a normalized image.

    Values are roughly in [0, 1] after percentile normalization; gamma acts on the
    positive part only, so the background's sign and noise survive.

    >>> x = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    >>> bool(np.array_equal(intensity_jitter(np.random.default_rng(0), x, strength=0.0), x))
    True
    """
    if strength <= 0:
        return x
    gamma = float(np.exp(rng.uniform(-0.4, 0.4) * strength))
    y = np.where(x > 0, np.abs(x) ** gamma, x)
    y = y * float(np.exp(rng.uniform(-0.25, 0.25) * strength)) + float(rng.uniform(-0.08, 0.08) * strength)
    if rng.random() < 0.3 * strength:
        y = y + rng.normal(0.0, float(rng.uniform(0.0, 0.05) * strength), x.shape)
    return np.asarray(y, np.float32)
