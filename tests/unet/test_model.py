from __future__ import annotations

import pytest
import torch

from unet import GeometryError, UNet, UNetConfig


def test_paper_defaults_shape_and_parameter_count() -> None:
    model = UNet(UNetConfig()).eval()
    assert round(model.num_parameters() / 1e6, 1) == 31.0
    with torch.inference_mode():
        y = model(torch.zeros(1, 1, 572, 572))
    assert y.shape == (1, 2, 388, 388)


def test_without_batch_norm_is_the_paper_count() -> None:
    # the 2015 paper's network (no BN) for 2 classes
    assert UNet(UNetConfig(batch_norm=False)).num_parameters() == 31_030_658


def test_wrong_channels_refused_with_both_numbers() -> None:
    model = UNet(UNetConfig(in_channels=3, base_width=2))
    with pytest.raises(GeometryError, match="expected 3 input channel"):
        model(torch.zeros(1, 1, 188, 188))


def test_wrong_size_refused_with_nearest_sizes() -> None:
    model = UNet(UNetConfig(base_width=2))
    with pytest.raises(GeometryError, match="556 or 572"):
        model(torch.zeros(1, 1, 570, 572))


@pytest.mark.parametrize("bad", [{"depth": 0}, {"base_width": -1}, {"in_channels": 1.5}, {"batch_norm": "yes"}])
def test_config_validates(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="UNetConfig"):
        UNetConfig(**bad)  # type: ignore[arg-type]


def test_config_round_trips_and_refuses_unknown_fields() -> None:
    cfg = UNetConfig(in_channels=3, num_classes=4, depth=3, base_width=8, batch_norm=False)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig fields: dropout"):
        UNetConfig.from_dict({**cfg.to_dict(), "dropout": 0.5})
