"""The valid-padding U-Net of Ronneberger, Fischer & Brox (MICCAI 2015).

Unpadded 3x3 convolutions (+ optional batch norm) and ReLU, twice per level; 2x2
max-pooling down; 2x2 transposed convolutions up; the encoder's features centre-cropped
and concatenated onto the decoder's; a 1x1 head. With the defaults a 1x572x572 tile
gives a num_classes x 388x388 map and the network holds ~31.0M parameters.

The model knows nothing about tiles: it takes any valid input size (see
:mod:`unet.geometry`) and refuses others with the nearest valid sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from . import geometry
from .errors import GeometryError

__all__ = ["DoubleConv", "Down", "UNet", "UNetConfig", "Up", "center_crop"]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1  # image channels the network reads (1 for grayscale, 3 for RGB)
    num_classes: int = 2  # output channels of the 1x1 head, one per class
    depth: int = 4  # number of 2x2 poolings; 4 gives the paper's 572 -> 388 tiles
    base_width: int = 64  # feature channels at the first level, doubled at each level down
    batch_norm: bool = True  # BN after each conv (common reimplementations); eval mode at inference

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "depth", "base_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.batch_norm, bool):
            raise ValueError(f"UNetConfig.batch_norm must be a bool, got {self.batch_norm!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {', '.join(unknown)}")
        return cls(**data)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central ``height x width`` window of a (B, C, H, W) tensor."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class DoubleConv(nn.Sequential):
    """Two unpadded 3x3 convolutions, each followed by (BN and) ReLU: trims 4 px per axis."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers.append(nn.Conv2d(c, c_out, kernel_size=3, padding=0, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Module):
    """2x2 max-pool, then a double conv."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(c_in, c_out, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(self.pool(x))  # (B, C, H, W) -> (B, 2C, H/2 - 4, W/2 - 4)
        return out


class Up(nn.Module):
    """2x2 up-convolution halving the channels, crop-and-concat the skip, double conv."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(c_in, c_out, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C/2, 2H, 2W)
        skip = center_crop(skip, x.shape[-2], x.shape[-1])  # (B, C/2, 2H, 2W)
        out: torch.Tensor = self.conv(torch.cat([skip, x], dim=1))  # (B, C/2, 2H - 4, 2W - 4)
        return out


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        w, bn = config.base_width, config.batch_norm
        widths = [w * 2**i for i in range(config.depth + 1)]  # 64, 128, 256, 512, 1024
        self.inc = DoubleConv(config.in_channels, widths[0], bn)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], bn) for i in range(config.depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], bn) for i in reversed(range(config.depth)))
        self.head = nn.Conv2d(widths[0], config.num_classes, kernel_size=1)

    @property
    def margin(self) -> int:
        """Context pixels consumed on each side (92 for depth 4)."""
        return geometry.context_margin(self.config.depth)

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse a tensor the network cannot take, saying what it expected."""
        if x.ndim != 4:
            raise GeometryError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            raise GeometryError(f"expected {self.config.in_channels} input channel(s), got {x.shape[1]}")
        for n in x.shape[-2:]:
            geometry.check_input_size(int(n), self.config.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)  # (B, C_in, H, W)
        skips = [self.inc(x)]  # (B, 64, H - 4, W - 4)
        for down in self.downs:
            skips.append(down(skips[-1]))  # ... (B, 1024, k, k) at the bottom
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())  # (B, C/2, 2H - 4, 2W - 4)
        out: torch.Tensor = self.head(x)  # (B, num_classes, H - 2*margin, W - 2*margin)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
