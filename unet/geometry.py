"""Size arithmetic of the valid-padding (unpadded) U-Net of Ronneberger et al. (2015).

Every 3x3 convolution is unpadded and trims 2 px; each level runs two of them; the
encoder halves the size ``depth`` times with 2x2 max-pooling and the decoder doubles it
back with 2x2 up-convolutions. With ``P = 2**depth`` and ``k`` the bottleneck's output
size, an axis of the input and of the output measure::

    input  = P*k + 8P - 4        (depth 4: 16k + 124;  k = 28 gives 572)
    output = P*k - 4P + 4        (depth 4: 16k - 60;   k = 28 gives 388)

so that

* the **pooling period** is ``P``: the network is translation-equivariant only for
  shifts that are multiples of it (the pooling grid must stay aligned);
* the **context margin** lost on each side is ``(input - output) / 2 = 6P - 4``
  (92 px for depth 4);
* the smallest output is 4 px (``k = 4``; below that a decoder level has nothing left).

All functions here are pure and work on one axis; apply them per axis for non-square
tiles.
"""

from __future__ import annotations

from .errors import GeometryError

__all__ = [
    "DEFAULT_DEPTH",
    "check_input_size",
    "context_margin",
    "input_size",
    "is_valid_input_size",
    "nearest_valid_input_sizes",
    "output_size",
    "pooling_period",
    "smallest_valid_output_at_least",
    "valid_input_sizes",
]

DEFAULT_DEPTH = 4
_MIN_K = 4  # smallest bottleneck size that leaves >= 1 px after every decoder level


def pooling_period(depth: int = DEFAULT_DEPTH) -> int:
    """Shift period under which the network is translation-equivariant.

    >>> pooling_period(4)
    16
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise GeometryError(f"depth must be an integer >= 1, got {depth!r}")
    return int(2**depth)


def context_margin(depth: int = DEFAULT_DEPTH) -> int:
    """Pixels of context consumed on each side of a tile.

    >>> context_margin(4)
    92
    >>> (572 - 388) // 2
    92
    """
    return 6 * pooling_period(depth) - 4


def _input_offset(depth: int) -> int:
    return 8 * pooling_period(depth) - 4


def is_valid_input_size(n: int, depth: int = DEFAULT_DEPTH) -> bool:
    """Whether one axis of ``n`` pixels can go through the network.

    >>> is_valid_input_size(572), is_valid_input_size(570)
    (True, False)
    >>> is_valid_input_size(172)  # aligned, but nothing would be left
    False
    """
    k, rest = divmod(n - _input_offset(depth), pooling_period(depth))
    return rest == 0 and k >= _MIN_K


def valid_input_sizes(depth: int = DEFAULT_DEPTH, *, start: int = 1, stop: int = 1024) -> list[int]:
    """Valid input sizes in ``[start, stop)``.

    >>> valid_input_sizes(4, start=500, stop=600)
    [508, 524, 540, 556, 572, 588]
    >>> valid_input_sizes(4, stop=220)
    [188, 204]
    """
    first = nearest_valid_input_sizes(start, depth)[1]
    return list(range(first, stop, pooling_period(depth)))


def nearest_valid_input_sizes(n: int, depth: int = DEFAULT_DEPTH) -> tuple[int | None, int]:
    """The closest valid input sizes below ``n`` (None if there is none) and at or above it.

    >>> nearest_valid_input_sizes(570)
    (556, 572)
    >>> nearest_valid_input_sizes(572)
    (572, 572)
    >>> nearest_valid_input_sizes(100)
    (None, 188)
    """
    period = pooling_period(depth)
    smallest = _input_offset(depth) + _MIN_K * period
    if n <= smallest:
        return (smallest if n == smallest else None), smallest
    above = n + (-(n - _input_offset(depth))) % period
    below = above if above == n else above - period
    return below, above


def check_input_size(n: int, depth: int = DEFAULT_DEPTH) -> None:
    """Refuse an invalid input size, naming the nearest valid ones.

    >>> check_input_size(572)
    >>> check_input_size(570)
    Traceback (most recent call last):
    ...
    unet.errors.GeometryError: input size 570 is not valid for a depth-4 valid U-Net (sizes are 16k+124 with k >= 4); nearest valid sizes: 556 or 572
    """
    if is_valid_input_size(n, depth):
        return
    below, above = nearest_valid_input_sizes(n, depth)
    nearest = f"{below} or {above}" if below is not None else f"{above}"
    raise GeometryError(
        f"input size {n} is not valid for a depth-{depth} valid U-Net "
        f"(sizes are {pooling_period(depth)}k+{_input_offset(depth)} with k >= {_MIN_K}); "
        f"nearest valid sizes: {nearest}"
    )


def output_size(n: int, depth: int = DEFAULT_DEPTH) -> int:
    """Output pixels along one axis for an input of ``n`` pixels.

    >>> output_size(572)
    388
    >>> output_size(188), output_size(828), output_size(1084)
    (4, 644, 900)
    """
    check_input_size(n, depth)
    return n - 2 * context_margin(depth)


def input_size(out: int, depth: int = DEFAULT_DEPTH) -> int:
    """Input pixels needed along one axis for an output of ``out`` pixels.

    >>> input_size(388)
    572
    >>> input_size(390)
    Traceback (most recent call last):
    ...
    unet.errors.GeometryError: output size 390 is not valid for a depth-4 valid U-Net (sizes are 16k-60 with k >= 4); nearest valid output sizes: 388 or 404
    """
    m2 = 2 * context_margin(depth)
    if is_valid_input_size(out + m2, depth):
        return out + m2
    below, above = nearest_valid_input_sizes(out + m2, depth)
    nearest = f"{below - m2} or {above - m2}" if below is not None else f"{above - m2}"
    raise GeometryError(
        f"output size {out} is not valid for a depth-{depth} valid U-Net "
        f"(sizes are {pooling_period(depth)}k-{m2 - _input_offset(depth)} with k >= {_MIN_K}); "
        f"nearest valid output sizes: {nearest}"
    )


def smallest_valid_output_at_least(n: int, depth: int = DEFAULT_DEPTH) -> int:
    """The smallest valid output size that covers ``n`` pixels.

    >>> smallest_valid_output_at_least(1), smallest_valid_output_at_least(100)
    (4, 100)
    >>> smallest_valid_output_at_least(389)
    404
    """
    m2 = 2 * context_margin(depth)
    return nearest_valid_input_sizes(max(n, 1) + m2, depth)[1] - m2
