"""Blocks of a plan put together equal the whole-image run; and why they are not Dask's map_overlap."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiling
from tests.conftest import make_model
from tiling import TilingError
from tiling.blocks import block_plan, block_size, plan_blocks
from unet import geometry

MARGIN = geometry.context_margin(4)


def identity(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return x[:, :, MARGIN:-MARGIN, MARGIN:-MARGIN]


def by_blocks(
    image: npt.NDArray[np.float32], model: object, size: int | tuple[int, int], **plan: object
) -> npt.NDArray[np.float32]:
    """Every block run on its own (its plan, a sink of its shape), then placed by the block grid."""
    predictor = tiling.CallablePredictor(model, depth=4) if not isinstance(model, torch.nn.Module) else None
    predictor = predictor or tiling.TorchPredictor(model, device="cpu", precision="fp32")
    whole = tiling.plan_tiles(image.shape[-2:], **plan)  # type: ignore[arg-type]
    grid = plan_blocks(whole, size)
    out = tiling.ArraySink(grid.image_shape, np.float32)
    for block in grid.tiles:
        bp = block_plan(whole, block)
        windows = [w.window for w in whole.tiles]
        assert bp.tiles and all(t.window in windows for t in bp.tiles)  # the plan's own tiles
        y = tiling.run(image, bp, predictor, tiling.ArraySink(bp.image_shape, np.float32), output="probabilities")
        out.add(block, y)
    return out.finish()


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 1700),
    w=st.integers(1, 1700),
    tile=st.sampled_from([388, 100, 644]),
    k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_identity_through_any_block_layout(h: int, w: int, tile: int, k: tuple[int, int]) -> None:
    img = np.random.default_rng(h * 31 + w).random((2, h, w), dtype=np.float32)
    stride = tiling.plan_tiles((h, w), tile_size=tile).stride
    out = by_blocks(img, identity, (k[0] * stride[0], k[1] * stride[1]), tile_size=tile)
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("shape", [(1000, 1300), (70, 900), (389, 50), (5, 7)])
def test_a_real_network_by_blocks_equals_the_whole_run(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = make_model().eval()
    img = np.random.default_rng(1).random(shape, dtype=np.float32)[None]
    whole = tiling.segment(img, model, output="probabilities", device="cpu", precision="fp32", normalize=None)
    got = by_blocks(img, model, 384)
    # the same tiles, batched differently: scores agree to float rounding (as batch sizes do), classes exactly
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(0), whole.argmax(0))


def test_block_sides_must_be_multiples_of_the_stride() -> None:
    plan = tiling.plan_tiles((2000, 2000))
    with pytest.raises(TilingError, match="multiple of the stride"):
        plan_blocks(plan, 1000)
    assert plan_blocks(tiling.plan_tiles((50, 50)), 1000).grid == (1, 1)  # one tile: any block size
    assert block_size(384, align=256) % 768 == 0


def test_dask_map_overlap_reflect_is_not_our_mirror_padding() -> None:
    """Regression pin: ``map_overlap(boundary="reflect")`` repeats the edge pixel (numpy's
    ``symmetric``), so it is not the mirror padding the network was trained and tiled with.
    Blocks read their windows through ``tiling.read_window`` instead; do not "simplify" to it."""
    da = pytest.importorskip("dask.array")
    a = np.arange(10.0)[None, :].repeat(3, 0)
    padded = da.from_array(a, chunks=(3, 5)).map_overlap(
        lambda b: b, depth={0: 0, 1: 3}, boundary="reflect", trim=False
    )
    row = np.asarray(padded.compute())[0, :3]
    assert row.tolist() == np.pad(a, ((0, 0), (3, 0)), mode="symmetric")[0, :3].tolist() == [2.0, 1.0, 0.0]
    ours = tiling.read_window(a, slice(0, 3), slice(0, 3), offset=3)[0]
    assert ours.tolist() == np.pad(a, ((0, 0), (3, 0)), mode="reflect")[0, :3].tolist() == [3.0, 2.0, 1.0]
    assert row.tolist() != ours.tolist()
    # and a depth larger than a chunk silently rechunks, moving block origins off the tile grid
    big = da.from_array(np.zeros((1, 700)), chunks=(1, 384)).map_overlap(
        lambda b: b, depth={0: 0, 1: 92 * 5}, boundary="reflect"
    )
    assert big.chunks[1] != (384, 316)
