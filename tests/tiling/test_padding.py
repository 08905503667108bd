from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from tiling import mirror_pad, read_window, reflect_indices


@given(n=st.integers(1, 40), before=st.integers(0, 200), after=st.integers(0, 200))
def test_reflect_indices_match_numpy_reflect(n: int, before: int, after: int) -> None:
    a = np.arange(n)
    np.testing.assert_array_equal(a[reflect_indices(-before, n + after, n)], np.pad(a, (before, after), "reflect"))


@given(
    h=st.integers(1, 30),
    w=st.integers(1, 30),
    r0=st.integers(-60, 60),
    c0=st.integers(-60, 60),
    rh=st.integers(1, 80),
    cw=st.integers(1, 80),
)
def test_read_window_equals_slicing_the_padded_image(h: int, w: int, r0: int, c0: int, rh: int, cw: int) -> None:
    img = np.arange(2 * h * w).reshape(2, h, w)
    pad = 200
    padded = mirror_pad(img, pad, (pad, pad))
    got = read_window(img, slice(r0 + pad, r0 + pad + rh), slice(c0 + pad, c0 + pad + cw), offset=pad)
    np.testing.assert_array_equal(got, padded[:, r0 + pad : r0 + pad + rh, c0 + pad : c0 + pad + cw])


class _CountingArray:
    """An array-like that records which region was read (as a lazy store would)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.reads = data, data.shape, []  # type: ignore[var-annotated]

    def __getitem__(self, key: tuple[object, ...]) -> np.ndarray:
        self.reads.append(key)
        return self.data[key]


def test_read_window_reads_only_the_bounding_box() -> None:
    store = _CountingArray(np.arange(1000 * 1000).reshape(1, 1000, 1000))
    out = read_window(store, slice(0, 100), slice(500, 600), offset=50)
    assert out.shape == (1, 100, 100)
    (key,) = store.reads
    assert key[1] == slice(0, 51) and key[2] == slice(450, 550)
