"""Mirror padding (numpy's ``reflect``: the edge pixel is not repeated), done lazily.

Tiles read their window straight from the unpadded image: indices that fall outside
are reflected back in, so no padded copy of a large image is ever made. For pads wider
than the image the reflection repeats (period ``2 * (n - 1)``), exactly as ``np.pad``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["mirror_pad", "plane_slices", "read_window", "reflect_indices"]


def reflect_indices(start: int, stop: int, n: int) -> npt.NDArray[np.intp]:
    """Indices into an axis of length ``n`` for the virtual range ``[start, stop)``.

    >>> reflect_indices(-3, 6, 4).tolist()
    [3, 2, 1, 0, 1, 2, 3, 2, 1]
    >>> reflect_indices(-2, 3, 1).tolist()
    [0, 0, 0, 0, 0]
    """
    i = np.arange(start, stop, dtype=np.intp)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def plane_slices(key: Any, kind: str) -> tuple[slice, slice, slice]:
    """``key`` of ``view[key]`` on a (C, Y, X) plane view as three slices (an ``...`` and missing
    trailing axes are full slices): what a lazy plane (``kind`` names it in the error) supports
    for :func:`read_window`.

    >>> plane_slices((Ellipsis, slice(1, 3)), "V")
    (slice(None, None, None), slice(None, None, None), slice(1, 3, None))
    """
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
    key = key + (slice(None),) * (3 - len(key))
    if len(key) != 3 or not all(isinstance(k, slice) for k in key):
        raise TypeError(f"{kind} supports slices only, got {key!r}")
    return key[0], key[1], key[2]


def read_window(image: Any, rows: slice, cols: slice, offset: int = 0) -> npt.NDArray[Any]:
    """The window ``image[..., rows, cols]`` of the mirror-padded image.

    ``rows``/``cols`` are in a frame shifted by ``offset`` (the padding margin), so they
    may run outside the image. ``image`` is any array-like with ``shape`` and slicing
    (numpy, memmap, zarr): only the bounding box of the needed pixels is read.

    >>> a = np.arange(12).reshape(3, 4)
    >>> read_window(a, slice(0, 5), slice(0, 6), offset=1).tolist() == np.pad(a, 1, "reflect").tolist()
    True
    """
    h, w = image.shape[-2:]
    r0, r1, c0, c1 = rows.start - offset, rows.stop - offset, cols.start - offset, cols.stop - offset
    if r0 >= 0 and r1 <= h and c0 >= 0 and c1 <= w:
        return np.asarray(image[..., r0:r1, c0:c1])
    iy, ix = reflect_indices(r0, r1, h), reflect_indices(c0, c1, w)
    y0, x0 = int(iy.min()), int(ix.min())
    box = np.asarray(image[..., y0 : int(iy.max()) + 1, x0 : int(ix.max()) + 1])
    return box[..., iy - y0, :][..., ix - x0]


def mirror_pad(image: npt.NDArray[Any], before: int, after: tuple[int, int]) -> npt.NDArray[Any]:
    """The whole padded frame (a copy): for references and tests, not the engine."""
    pad = [(0, 0)] * (image.ndim - 2) + [(before, after[0]), (before, after[1])]
    return np.pad(image, pad, mode="reflect")
