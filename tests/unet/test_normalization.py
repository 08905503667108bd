from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet import ChannelAffine, Normalization, UNetError
from unet.normalization import _percentiles


def test_percentile_maps_low_and_high_percentiles_to_0_and_1() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(100, 4000, size=(1, 300, 200)).astype(np.uint16)
    aff = Normalization(low=1, high=99.8).fit(img)
    out = aff(img[None])
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.percentile(out, [1, 99.8]), [0.0, 1.0], atol=1e-3)


def test_per_channel_statistics() -> None:
    img = np.stack([np.linspace(0, 10, 10000), np.linspace(0, 1000, 10000)]).reshape(2, 100, 100)
    out = Normalization(low=0, high=100).fit(img)(img[None])[0]
    np.testing.assert_allclose(out.min(axis=(1, 2)), [0, 0], atol=1e-6)
    np.testing.assert_allclose(out.max(axis=(1, 2)), [1, 1], atol=1e-6)


def test_constant_image_maps_to_zero_not_inf() -> None:
    img = np.full((1, 10, 10), 7, np.uint8)
    out = Normalization().fit(img)(img[None])
    assert np.isfinite(out).all() and (out == 0).all()


def test_fixed_mean_std() -> None:
    img = np.array([[[10.0, 14.0]]], np.float32)
    aff = Normalization("fixed", mean=(10.0,), std=(2.0,)).fit(img)
    np.testing.assert_allclose(aff(img[None]), [[[[0.0, 2.0]]]])


def test_channel_mismatch_refused() -> None:
    aff = Normalization().fit(np.zeros((1, 4, 4)))
    with pytest.raises(UNetError, match="fitted for 1 channel"):
        aff(np.zeros((1, 3, 4, 4)))
    with pytest.raises(UNetError, match="stores 1 channel"):
        Normalization("fixed", mean=(0.0,), std=(1.0,)).fit(np.zeros((3, 4, 4)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low": 50, "high": 10},
        {"method": "fixed"},
        {"method": "fixed", "mean": (0.0,), "std": (0.0,)},
        {"method": "zscore"},
    ],
)
def test_invalid_settings_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(UNetError):
        Normalization(**kwargs)  # type: ignore[arg-type]


def test_dict_round_trip() -> None:
    n = Normalization("fixed", mean=(1.0, 2.0), std=(3.0, 4.0))
    assert Normalization.from_dict(n.to_dict()) == n


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(["uint8", "uint16", "int16", "int32", "float32"]),
    n=st.integers(1, 2000),
    qs=st.lists(st.floats(0, 100), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    coarse=st.booleans(),
)
def test_histogram_percentiles_match_numpy(dtype: str, n: int, qs: list[float], seed: int, coarse: bool) -> None:
    """The integer fast path gives np.percentile's numbers (ties and extremes included)."""
    rng = np.random.default_rng(seed)
    lo, hi = (-30000, 30000) if dtype in ("int16", "int32", "float32") else (0, np.iinfo(dtype).max)
    values = rng.integers(lo, hi + 1, n)
    if coarse:  # many ties
        values = values // 1000 * 1000
    values = values.astype(dtype)
    quantiles = (*qs, 0.0, 1.0, 99.8, 100.0)
    expected = np.percentile(values.astype(np.float64), quantiles)
    np.testing.assert_allclose(_percentiles(values, quantiles), expected, rtol=1e-13, atol=1e-9)


def test_percentiles_are_fitted_on_finite_pixels_only() -> None:
    """One NaN made both percentiles NaN (the whole mask background); one inf made the span infinite."""
    rng = np.random.default_rng(1)
    img = rng.normal(100, 10, (1, 80, 90)).astype(np.float32)
    bad = img.copy()
    bad[0, 5, 7], bad[0, 40, 40], bad[0, 70, 3] = np.nan, np.inf, -np.inf
    finite = bad[np.isfinite(bad)].astype(np.float64)
    lo, hi = np.percentile(finite, [1.0, 99.8])
    aff = Normalization().fit(bad)
    np.testing.assert_allclose(aff.scale, [1 / (hi - lo)], rtol=1e-12)
    np.testing.assert_allclose(aff.offset, [-lo / (hi - lo)], rtol=1e-12)
    assert (aff.low, aff.high) == ((lo,), (hi,))


def test_non_finite_pixels_become_the_ends_of_the_fitted_range() -> None:
    """NaN (no data) -> the low percentile (0), +inf -> the high one (1), -inf -> 0; finite pixels
    are mapped as before, unclipped."""
    img = np.arange(1000, dtype=np.float32).reshape(1, 20, 50)
    img[0, 0, :3] = np.nan, np.inf, -np.inf
    aff = Normalization(low=10, high=90).fit(img)
    out = aff(img[None])[0, 0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, :3], [0.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[0, 3:], img[0, 0, 3:] * aff.scale[0] + aff.offset[0], rtol=1e-6)
    assert img[0, 0, 1] == np.inf  # the input is not modified


def test_all_nan_channel_is_fitted_as_0_to_1_and_maps_to_0() -> None:
    img = np.stack([np.full((6, 7), np.nan), np.arange(42.0).reshape(6, 7)]).astype(np.float32)
    aff = Normalization(low=0, high=100).fit(img)
    assert aff.scale[0] == 1.0 and aff.offset[0] == 0.0
    out = aff(img[None])[0]
    assert (out[0] == 0).all()
    np.testing.assert_allclose(out[1].max(), 1.0)


def test_fixed_normalization_sends_non_finite_pixels_to_3_std_without_reading_the_image() -> None:
    img = np.array([[[10.0, 20.0, np.nan, np.inf, -np.inf]]], np.float32)
    aff = Normalization("fixed", mean=(15.0,), std=(5.0,)).fit(img)
    np.testing.assert_allclose(aff(img[None])[0, 0, 0], [-1.0, 1.0, -3.0, 3.0, -3.0])


def test_affine_without_ends_maps_nan_to_0_and_inf_to_1() -> None:
    aff = ChannelAffine((0.5,), (-1.0,))
    np.testing.assert_allclose(aff(np.array([[[[np.nan, np.inf, -np.inf, 4.0]]]], np.float32)), [[[[0, 1, 0, 1]]]])
