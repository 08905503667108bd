"""The rescaled view and the way back: exact, window by window, for any tiling."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiling
from tests.conftest import make_model
from tiling import ArraySink, TilingError
from tiling.engine import _float32
from tiling.predictor import as_predictor
from tiling.rescale import RescaleBack, RescaledPlane, axis_weights, band_plan, scaled_shape
from unet import geometry

MARGIN = geometry.context_margin(4)


def _dense(image: npt.NDArray[Any], shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    """The reference: the whole image through both axes' matrices at once."""
    rows, cols = axis_weights(image.shape[-2], shape[0]), axis_weights(image.shape[-1], shape[1])
    return np.stack([rows @ c.astype(np.float64) @ cols.T for c in image])


@given(n_in=st.integers(1, 400), n_out=st.integers(1, 400))
@settings(max_examples=80, deadline=None)
def test_weights_are_a_mean_of_nearby_pixels(n_in: int, n_out: int) -> None:
    m = axis_weights(n_in, n_out)
    assert m.shape == (n_out, n_in)
    np.testing.assert_allclose(np.asarray(m.sum(axis=1)).ravel(), 1.0, rtol=1e-12)
    assert (m.data > 0).all()
    reach = max(1.0, n_in / n_out) + 1
    rows, cols = m.nonzero()
    centres = (rows + 0.5) * n_in / n_out - 0.5
    assert (np.abs(cols - centres) <= reach).all()


def test_same_size_is_the_identity_and_the_view_gives_the_input_back() -> None:
    assert (axis_weights(7, 7).toarray() == np.eye(7)).all()
    a = np.random.default_rng(0).integers(0, 65535, (2, 50, 61)).astype(np.uint16)
    np.testing.assert_array_equal(RescaledPlane(a, (50, 61))[...], a.astype(np.float32))


def test_a_constant_image_stays_constant() -> None:
    a = np.full((1, 97, 45), 7.5, np.float32)
    for shape in [(30, 14), (200, 101)]:
        np.testing.assert_allclose(RescaledPlane(a, shape)[...], 7.5, rtol=1e-6)


@pytest.mark.parametrize("factor", [0.13, 0.37, 0.5, 1.7, 3.0])
def test_every_window_reads_the_same_pixels(factor: float) -> None:
    """The tiles of a rescaled image overlap; each pixel must not depend on the window."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 301, 257)).astype(np.float32)
    shape = scaled_shape((301, 257), factor)
    view = RescaledPlane(a, shape)
    whole = view[...]
    np.testing.assert_allclose(whole, _dense(a, shape), atol=1e-5)
    h, w = shape
    for r0, r1, c0, c1 in [(0, h, 0, w), (1, h // 2 + 1, 3, w), (h // 3, h, 0, max(1, w // 2)), (h - 1, h, w - 1, w)]:
        np.testing.assert_array_equal(view[..., r0:r1, c0:c1], whole[..., r0:r1, c0:c1])
    np.testing.assert_array_equal(view[:, ::3, ::2], whole[:, ::3, ::2])  # a strided sample (the normalization's)


def test_band_plan_partitions_the_rows() -> None:
    plan = band_plan((10, 4), [0, 3, 10])
    assert plan.grid == (2, 1) and [t.dest[0] for t in plan.tiles] == [slice(0, 3), slice(3, 10)]
    with pytest.raises(TilingError):
        band_plan((10, 4), [0, 3, 3, 10])


def _feed(back: RescaleBack, scores: npt.NDArray[np.float32]) -> None:
    plan = back.scaled_plan
    for t in plan.tiles:
        y = np.zeros((scores.shape[0], *plan.tile_out), np.float32)
        y[(..., *t.keep)] = scores[(..., *t.dest)]
        back.add(t, y)


@pytest.mark.parametrize(
    ("scaled", "shape", "tile"),
    [((111, 152), (300, 410), 4), ((690, 943), (300, 410), 100), ((150, 205), (300, 410), 388), ((37, 5), (1, 1), 4)],
)
def test_the_way_back_streams_band_by_band_and_equals_the_whole_resample(
    scaled: tuple[int, int], shape: tuple[int, int], tile: int
) -> None:
    rng = np.random.default_rng(2)
    scores = rng.random((3, *scaled)).astype(np.float32)
    plan = tiling.plan_tiles(scaled, tile_size=tile)
    reference = _dense(scores, shape)
    for output in ("probabilities", "labels"):
        back = RescaleBack(plan, shape, output)  # type: ignore[arg-type]
        dtype = np.float32 if output == "probabilities" else np.uint8
        back.connect(ArraySink(shape, dtype))
        _feed(back, scores)
        out = back.finish()
        assert out.shape == ((3, *shape) if output == "probabilities" else shape)
        if output == "probabilities":
            np.testing.assert_allclose(out, reference, atol=1e-5)
        else:
            np.testing.assert_array_equal(out, reference.argmax(0))


def test_the_way_back_needs_scores() -> None:
    plan = tiling.plan_tiles((20, 20))
    back = RescaleBack(plan, (40, 40), "labels").connect(ArraySink((40, 40), np.uint8))
    with pytest.raises(TilingError, match="class scores"):
        back.add(plan.tiles[0], np.zeros(plan.tile_out, np.uint8))


def _rescaled_run(model: Any, img: npt.NDArray[np.float32], shape: tuple[int, int], tile: int) -> npt.NDArray[Any]:
    plan = tiling.plan_tiles(shape, tile_size=tile)
    back = RescaleBack(plan, img.shape[-2:], "labels")
    back.connect(ArraySink(img.shape[-2:], np.uint8))
    predictor = as_predictor(model, depth=4)
    return tiling.run(RescaledPlane(img, shape), plan, predictor, back, output="probabilities", normalize=_float32)


def test_a_rescaled_run_is_one_whole_pass_over_the_rescaled_image_mapped_back() -> None:
    """What "exact" means once rescaled: tiles on the rescaled image's own pooling grid give one
    whole pass over it, and the way back is the one resample, whatever the tile size."""
    model = make_model(base_width=4, num_classes=3)
    img = np.random.default_rng(3).normal(size=(1, 333, 421)).astype(np.float32)
    shape = scaled_shape((333, 421), 1.9)
    scaled = RescaledPlane(img, shape)[...]
    plan = tiling.plan_tiles(shape)
    ph, pw = plan.padded_shape
    padded = tiling.mirror_pad(scaled, MARGIN, (ph - MARGIN - shape[0], pw - MARGIN - shape[1]))
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.ascontiguousarray(padded[None])))
    whole = torch.softmax(logits, 1)[0, :, : shape[0], : shape[1]].numpy()
    reference = _dense(whole, (333, 421)).argmax(0)
    got = {tile: _rescaled_run(model, img, shape, tile) for tile in (388, 644)}
    np.testing.assert_array_equal(got[388], got[644])
    assert (got[388] != reference).mean() < 1e-4  # float32 softmax vs the float64 reference: ties only


def test_identity_network_at_scale_one_gives_the_input_back() -> None:
    img = np.random.default_rng(4).random((3, 90, 70)).astype(np.float32)

    def identity(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return x[:, :, MARGIN:-MARGIN, MARGIN:-MARGIN]

    plan = tiling.plan_tiles((90, 70))
    back = RescaleBack(plan, (90, 70), "probabilities").connect(ArraySink((90, 70), np.float32))
    predictor = as_predictor(identity, depth=4)
    out = tiling.run(RescaledPlane(img, (90, 70)), plan, predictor, back, output="probabilities", normalize=_float32)
    np.testing.assert_array_equal(out, img)
