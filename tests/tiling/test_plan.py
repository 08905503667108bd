from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiling import TilingError, axis_layout, plan_tiles
from unet import GeometryError, geometry


@given(size=st.integers(1, 5000), tile=st.sampled_from([4, 20, 388, 644, 900]), data=st.data())
def test_kept_ranges_partition_the_axis(size: int, tile: int, data: st.DataObject) -> None:
    stride = data.draw(st.integers(1, tile))
    layout = axis_layout(size, tile, stride)
    assert layout[0][1] == 0 and layout[-1][2] == size
    for (o, k0, k1), nxt in zip(layout, [*layout[1:], None], strict=True):
        assert o <= k0 < k1 <= o + tile  # kept part lies inside the tile's output
        if nxt is not None:
            assert nxt[1] == k1  # contiguous: nothing written twice, nothing missed
            assert nxt[0] - o == stride


@given(h=st.integers(1, 3000), w=st.integers(1, 3000), tile=st.sampled_from([388, 644, 900]))
def test_default_plan_is_on_the_pooling_grid_and_valid(h: int, w: int, tile: int) -> None:
    plan = plan_tiles((h, w), tile_size=tile)
    assert plan.seam_free
    for t in plan.tiles:
        for win, size in zip(t.window, plan.tile_in, strict=True):
            assert win.start % 16 == 0  # origins on multiples of 2**depth in the padded frame
            assert win.stop - win.start == size
            geometry.check_input_size(size)
    covered = sum((t.dest[0].stop - t.dest[0].start) * (t.dest[1].stop - t.dest[1].start) for t in plan.tiles)
    assert covered == h * w


def test_default_stride_and_grid_for_the_paper_tile() -> None:
    plan = plan_tiles((4096, 4096))
    assert plan.stride == (384, 384)
    assert plan.tile_out == (388, 388) and plan.tile_in == (572, 572)
    assert plan.grid == (11, 11)


def test_small_images_get_the_smallest_covering_tile() -> None:
    plan = plan_tiles((1, 1))
    assert plan.tile_out == (4, 4) and plan.tile_in == (188, 188) and len(plan) == 1
    assert plan_tiles((100, 5000)).tile_out == (100, 388)


def test_paper_stride_is_off_grid() -> None:
    plan = plan_tiles((900, 900), stride=388)
    assert not plan.seam_free
    assert [t.window[1].start for t in plan.tiles[:3]] == [0, 388, 776]


def test_invalid_tile_size_names_nearest() -> None:
    with pytest.raises(GeometryError, match=r"output size 400 .* 388 or 404"):
        plan_tiles((1000, 1000), tile_size=400)


@pytest.mark.parametrize("stride", [0, -3])
def test_bad_stride_refused(stride: int) -> None:
    with pytest.raises(TilingError, match="stride must be between 1"):
        plan_tiles((1000, 1000), stride=stride)
