"""Input normalization that travels with a checkpoint.

Statistics are computed **once per image** (from a bounded, deterministic sample of its
pixels), never per tile, so tiles of one image are normalized identically and there are
no intensity jumps at tile borders. The result is a per-channel affine map
``x * scale + offset`` applied to each tile as it is fed to the network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import UNetError

__all__ = ["ChannelAffine", "Normalization"]

Method = Literal["percentile", "fixed"]
_SAMPLE_PIXELS = 1 << 22  # per channel; a strided sample keeps huge images cheap


@dataclass(frozen=True)
class ChannelAffine:
    """Per-channel ``x * scale + offset``; call it on (..., C, H, W) arrays."""

    scale: tuple[float, ...]
    offset: tuple[float, ...]

    def __call__(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        c = x.shape[-3]
        if c != len(self.scale):
            raise UNetError(f"normalization fitted for {len(self.scale)} channel(s), got {c}")
        scale = np.asarray(self.scale, np.float32).reshape(c, 1, 1)
        offset = np.asarray(self.offset, np.float32).reshape(c, 1, 1)
        out = x.astype(np.float32, copy=True)
        out *= scale
        out += offset
        return out


@dataclass(frozen=True)
class Normalization:
    """How pixel values are mapped before the network sees them.

    ``percentile``: per image and channel, the ``low``-th percentile goes to 0 and the
    ``high``-th to 1 (robust to camera offsets and bit depth; the default for
    fluorescence, where brightness spans orders of magnitude).
    ``fixed``: ``(x - mean) / std`` with per-channel constants stored in the checkpoint.
    """

    method: Method = "percentile"
    low: float = 1.0
    high: float = 99.8
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method == "percentile":
            if not 0.0 <= self.low < self.high <= 100.0:
                raise UNetError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")
        elif self.method == "fixed":
            if not self.mean or len(self.mean) != len(self.std):
                raise UNetError("fixed normalization needs one mean and one std per channel")
            if any(s <= 0 for s in self.std):
                raise UNetError(f"std must be > 0, got {self.std}")
        else:
            raise UNetError(f"unknown normalization method {self.method!r}; expected 'percentile' or 'fixed'")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalization:
        data = dict(data)
        data["mean"] = tuple(float(v) for v in data.get("mean", ()))
        data["std"] = tuple(float(v) for v in data.get("std", ()))
        return cls(**data)

    def fit(self, image: npt.NDArray[Any]) -> ChannelAffine:
        """The affine map for one (C, H, W) image (or a view/array-like of it)."""
        c = image.shape[0]
        if self.method == "fixed":
            if len(self.mean) != c:
                raise UNetError(f"normalization stores {len(self.mean)} channel(s), image has {c}")
            return ChannelAffine(
                tuple(1.0 / s for s in self.std), tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))
            )
        sample = _sample(image)
        lo, hi = np.percentile(sample.reshape(c, -1).astype(np.float64), [self.low, self.high], axis=1)
        span = np.maximum(hi - lo, 1e-6)  # a constant image maps to 0, not to inf
        return ChannelAffine(tuple(float(v) for v in 1.0 / span), tuple(float(v) for v in -lo / span))


def _sample(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A deterministic strided sample of at most ~_SAMPLE_PIXELS pixels per channel."""
    h, w = image.shape[-2:]
    step = max(1, int(np.ceil(np.sqrt(h * w / _SAMPLE_PIXELS))))
    return np.asarray(image[:, ::step, ::step])
