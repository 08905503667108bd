"""The object size a model was trained for, recorded in its checkpoint.

A model sees objects well over a range of sizes (in pixels). :class:`ObjectSize` records
that range: ``native`` is the diameter it is best at, and inside ``[low, high]`` an image
is segmented as it is; an image whose objects are outside it is rescaled so that they come
out at ``native`` px (:meth:`ObjectSize.factor`). ``trained`` is the range its training data
covered (wider: the model degrades gracefully near it); ``pixel_size_um`` is the pixel size
the native scale stands for (for a physical ``--pixel-size``), nominal for synthetic data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import CheckpointError

__all__ = ["MAX_FACTOR", "MIN_FACTOR", "ObjectSize"]

MIN_FACTOR, MAX_FACTOR = 1 / 8, 4.0  # the most an image is shrunk or enlarged


@dataclass(frozen=True)
class ObjectSize:
    """Diameters in px of the model's input.

    >>> s = ObjectSize(native=24.0, low=12.0, high=48.0)
    >>> s.factor(30.0), s.factor(96.0), s.factor(6.0)
    (1.0, 0.25, 4.0)
    """

    native: float
    low: float
    high: float
    trained: tuple[float, float] | None = None
    pixel_size_um: float | None = None  # µm per px at the native scale (None: not known)

    def __post_init__(self) -> None:
        values = (self.native, self.low, self.high)
        if not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values):
            raise CheckpointError(f"object size must be positive numbers, got {values}")
        if not self.low <= self.native <= self.high:
            raise CheckpointError(f"object size needs low <= native <= high, got {values}")
        if self.pixel_size_um is not None and not (math.isfinite(self.pixel_size_um) and self.pixel_size_um > 0):
            raise CheckpointError(f"pixel size must be > 0 µm, got {self.pixel_size_um}")

    def factor(self, diameter: float) -> float:
        """The rescale factor (rescaled / input) for objects ``diameter`` px across: 1 inside
        ``[low, high]``, else what brings them to ``native`` (within [1/8, 4])."""
        if not (math.isfinite(diameter) and diameter > 0):
            raise ValueError(f"a diameter must be > 0 px, got {diameter}")
        if self.low <= diameter <= self.high:
            return 1.0
        return min(MAX_FACTOR, max(MIN_FACTOR, self.native / diameter))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectSize:
        known = {"native", "low", "high", "trained", "pixel_size_um"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"unknown object size fields: {unknown}")
        try:
            trained = data.get("trained")
            return cls(
                native=float(data["native"]),
                low=float(data["low"]),
                high=float(data["high"]),
                trained=None if trained is None else (float(trained[0]), float(trained[1])),
                pixel_size_um=None if data.get("pixel_size_um") is None else float(data["pixel_size_um"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"invalid object size {dict(data)!r}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.trained is not None:
            d["trained"] = list(self.trained)
        return d
