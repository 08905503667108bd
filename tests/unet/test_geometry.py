from __future__ import annotations

import pytest
import torch

from unet import GeometryError, UNet, UNetConfig, geometry


def test_paper_numbers() -> None:
    assert geometry.output_size(572) == 388
    assert geometry.input_size(388) == 572
    assert geometry.context_margin(4) == 92
    assert geometry.pooling_period(4) == 16


def test_depth4_valid_sizes_are_16k_plus_124() -> None:
    sizes = geometry.valid_input_sizes(4, stop=2000)
    assert sizes[0] == 188
    assert all((n - 124) % 16 == 0 for n in sizes)
    assert all(geometry.output_size(n) == n - 184 for n in sizes)
    assert all((geometry.output_size(n) + 60) % 16 == 0 for n in sizes)
    assert [n for n in range(2000) if geometry.is_valid_input_size(n)] == sizes


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_formulas_match_the_real_network(depth: int) -> None:
    """Every size the formulas call valid runs through a real network with that output; others fail."""
    model = UNet(UNetConfig(base_width=1, depth=depth, batch_norm=False)).eval()
    margin = geometry.context_margin(depth)
    for n in range(2 * margin - 8, 2 * margin + 4 * 2**depth + 40):
        x = torch.zeros(1, 1, n, n)
        if geometry.is_valid_input_size(n, depth):
            with torch.no_grad():
                assert model(x).shape[-2:] == (n - 2 * margin, n - 2 * margin)
        else:
            with pytest.raises(GeometryError, match=f"input size {n} is not valid"):
                model(x)


def test_non_square_input() -> None:
    model = UNet(UNetConfig(base_width=1, batch_norm=False)).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 188, 572)).shape == (2, 2, 4, 388)


def test_invalid_size_names_nearest_valid_sizes() -> None:
    with pytest.raises(GeometryError, match=r"input size 570 .* nearest valid sizes: 556 or 572"):
        geometry.check_input_size(570)
    with pytest.raises(GeometryError, match=r"nearest valid sizes: 188$"):
        geometry.check_input_size(10)
    with pytest.raises(GeometryError, match=r"output size 390 .* 388 or 404"):
        geometry.input_size(390)


def test_smallest_valid_output_covers() -> None:
    for n in range(1, 1000):
        out = geometry.smallest_valid_output_at_least(n)
        assert out >= n
        assert geometry.is_valid_input_size(out + 184)
        assert out - 16 < max(n, 4)


def test_bad_depth_refused() -> None:
    with pytest.raises(GeometryError, match="depth"):
        geometry.pooling_period(0)
