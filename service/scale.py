"""At what scale an image is segmented: the object-size setting, and the automatic estimate.

The checkpoint records the object diameters its model was trained for
(:class:`unet.size.ObjectSize`). For each image, :func:`resolve_scale` turns the options
into one rescale factor (rescaled size / input size):

- ``diameter=D`` (px): the objects are about ``D`` px across; the image is rescaled so they
  come out at the model's native diameter.
- ``pixel_size=P`` (µm per px) given by the caller: rescaled so that ``P`` becomes the
  model's pixel size (needs a checkpoint that records one; the demo model's is nominal).
- ``diameter="auto"`` (the default): :func:`estimate_diameter` segments a central crop of
  plane 0 at the input's scale and at half of it, and at coarser scales while the coarser
  pass finds larger objects (the finer one splintered them), then rescales only if the
  objects are outside the model's range. The size measured is the area-weighted median of
  the objects' equivalent diameters (the diameter of the object that holds the median object
  pixel), so a few small fragments do not pull it down.
- ``diameter="off"``: never rescale.

The pixel size in the image's metadata is reported beside the estimate (the diameter in µm),
not used to rescale: the image's own objects are a better guide than a nominal object size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

import tiling
from tiling import ArraySink
from tiling.instances import InstanceRule, label_instances
from tiling.rescale import RescaledPlane, scaled_shape
from unet.size import MAX_FACTOR, MIN_FACTOR, ObjectSize

from .errors import OptionError
from .io import ImageHeader
from .segmenter import Segmenter

__all__ = [
    "ESTIMATE_CROP",
    "Diameter",
    "Scale",
    "estimate_diameter",
    "object_diameter",
    "parse_diameter",
    "resolve_scale",
]

log = logging.getLogger(__name__)

ESTIMATE_CROP = 768  # side (px, at the scale being tried) of the central crop the estimate segments
_MAX_CROP = 3072  # ... and at most this many input px
_AGREE = 1.3  # two scales agree when their diameters are within 30 %
Diameter = float | Literal["auto", "off"]


def parse_diameter(value: str | float | None) -> Diameter:
    """``auto``, ``off`` or a diameter in px (> 0).

    >>> parse_diameter("auto"), parse_diameter("35"), parse_diameter(None)
    ('auto', 35.0, 'auto')
    """
    if value is None:
        return "auto"
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "off"):
            return v  # type: ignore[return-value]
        try:
            value = float(v)
        except ValueError:
            raise OptionError(f"diameter must be auto, off or a number of pixels, got {value!r}") from None
    d = float(value)
    if not (math.isfinite(d) and 1.0 <= d <= 10000.0):
        raise OptionError(f"diameter must be between 1 and 10000 px, got {value!r}")
    return d


@dataclass(frozen=True)
class Scale:
    """The scale an image is segmented at (reported in ``/model``-like JSON, headers, logs)."""

    factor: float  # rescaled / input (1: as it is)
    shape: tuple[int, int]  # (Y, X) the model sees
    how: Literal["auto", "diameter", "pixel-size", "off", "unknown"]
    diameter_px: float | None = None  # the objects' diameter in input px (estimated or given)
    diameter_um: float | None = None  # the same in µm, where the pixel size is known
    passes: int = 0  # segmentations of the crop the estimate took

    @property
    def rescaled(self) -> bool:
        return self.factor != 1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    def header(self) -> str:
        """The ``X-Scale`` response header: ``factor; how; diameter``."""
        parts = [f"{self.factor:.4g}", self.how]
        if self.diameter_px is not None:
            parts.append(f"diameter={self.diameter_px:.1f}px")
        return "; ".join(parts)

    def describe(self) -> str:
        """One line for the CLI's log."""
        d = "" if self.diameter_px is None else f", objects ~{self.diameter_px:.0f} px"
        if self.diameter_um is not None:
            d += f" ({self.diameter_um:.1f} µm)"
        if not self.rescaled:
            return f"scale 1 (not rescaled; {self.how}{d})"
        return f"scale {self.factor:.3g} ({self.how}{d}): segmented at {self.shape[1]}x{self.shape[0]}"


def _size_of(segmenter: Segmenter) -> ObjectSize | None:
    return segmenter.checkpoint.size


def _um(header: ImageHeader, px: float | None) -> float | None:
    ps = header.pixel_size_um
    return None if ps is None or px is None else px * math.sqrt(ps[0] * ps[1])


def resolve_scale(
    segmenter: Segmenter,
    header: ImageHeader,
    plane0: Any,
    diameter: Diameter = "auto",
    pixel_size: float | None = None,
    rule: InstanceRule | None = None,
) -> Scale:
    """The one scale of an image (see the module docstring). ``plane0``: its first (C, Y, X) plane."""
    hw = (header.height, header.width)
    size = _size_of(segmenter)
    if diameter == "off":
        return Scale(1.0, hw, "off")
    if pixel_size is not None:
        if not (math.isfinite(pixel_size) and pixel_size > 0):
            raise OptionError(f"pixel size must be > 0 µm, got {pixel_size}")
        if size is None or size.pixel_size_um is None:
            raise OptionError("this checkpoint records no pixel size: give --diameter (px) instead of --pixel-size")
        factor = _clamp(pixel_size / size.pixel_size_um)
        native_px = size.native / factor
        return Scale(factor, scaled_shape(hw, factor), "pixel-size", native_px, native_px * pixel_size)
    if size is None:
        if diameter != "auto":
            raise OptionError("this checkpoint records no object size, so --diameter cannot rescale for it")
        return Scale(1.0, hw, "unknown")
    if diameter != "auto":
        factor = _clamp(size.native / float(diameter))
        return Scale(factor, scaled_shape(hw, factor), "diameter", float(diameter), _um(header, float(diameter)))
    d, factor, passes = estimate_diameter(segmenter, plane0, size, rule or _rule(segmenter))
    return Scale(factor, scaled_shape(hw, factor), "auto", d, _um(header, d), passes)


def _clamp(factor: float) -> float:
    f = min(MAX_FACTOR, max(MIN_FACTOR, factor))
    return 1.0 if abs(math.log(f)) < 0.02 else f  # within 2 %: as it is


def _rule(segmenter: Segmenter) -> InstanceRule:
    from .instances import instance_rule  # noqa: PLC0415  (instances imports the pipeline's sinks)

    return instance_rule(segmenter.checkpoint)


def object_diameter(ids: npt.NDArray[Any], min_area: int = 0) -> float | None:
    """The area-weighted median equivalent diameter of the objects in ``ids`` (px), those
    touching the border left out while any others exist; None without objects.

    >>> ids = np.zeros((60, 60), np.uint32); ids[10:20, 10:20] = 1; ids[30:50, 30:50] = 2
    >>> round(object_diameter(ids), 1)
    22.6
    """
    n = int(ids.max()) if ids.size else 0
    if n == 0:
        return None
    area = np.bincount(ids.ravel(), minlength=n + 1)[1:].astype(np.float64)
    border = np.zeros(n + 1, bool)
    border[np.concatenate([ids[0], ids[-1], ids[:, 0], ids[:, -1]])] = True
    keep = (area >= max(1, min_area)) & ~border[1:]
    if not keep.any():
        keep = area >= max(1, min_area)
    if not keep.any():
        return None
    d = np.sqrt(4.0 * area[keep] / np.pi)
    order = np.argsort(d)
    w = area[keep][order]
    k = int(np.searchsorted(np.cumsum(w), w.sum() / 2.0))
    return float(d[order][min(k, len(d) - 1)])


def _crop_diameter(segmenter: Segmenter, plane: Any, factor: float, rule: InstanceRule, affine: Any) -> float | None:
    """Segment a central crop of ``plane`` rescaled by ``factor``; the objects' diameter there (px)."""
    _, h, w = (int(n) for n in plane.shape)
    side = min(math.ceil(ESTIMATE_CROP / factor), _MAX_CROP)
    ch, cw = min(h, side), min(w, side)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = np.asarray(plane[:, y0 : y0 + ch, x0 : x0 + cw])
    view: Any = crop if factor == 1.0 else RescaledPlane(crop, scaled_shape((ch, cw), factor))
    plan = tiling.plan_tiles(tuple(view.shape[-2:]), depth=segmenter.depth)
    labels = tiling.run(
        view,
        plan,
        segmenter.predictor,
        ArraySink(plan.image_shape, np.uint8),
        batch_size=segmenter.batch_size,
        normalize=affine,
    )
    return object_diameter(label_instances(labels, rule), rule.min_area)


def estimate_diameter(
    segmenter: Segmenter, plane: Any, size: ObjectSize, rule: InstanceRule, affine: Any = None
) -> tuple[float | None, float, int]:
    """(objects' diameter in input px or None, the factor to segment at, passes taken).

    A model shown objects far larger than it knows splinters them into fragments, so one pass
    at the input's scale under-estimates them. So the crop is measured at the input's scale and
    at half of it: where both agree (within 30 %), that is the size; where the half-scale pass
    measures larger objects, the finer one was splintering, and the crop is measured again at
    half that scale, and so on (down to 1/8), until two neighbouring scales agree. A coarse
    pass whose objects measure below the model's range (``size.low`` px where it sees them) is
    not believed: objects shrunk past what the model sees come out as blobs of its smallest
    size, often merged, which would otherwise pass for larger objects.
    """
    affine = affine if affine is not None else segmenter.checkpoint.normalization.fit(plane)
    found: dict[float, float | None] = {}

    def at(f: float) -> float | None:
        if f not in found:
            d = _crop_diameter(segmenter, plane, f, rule, affine)
            found[f] = None if d is None else d / f
            log.debug("scale estimate: objects %s px at factor %.3g", found[f], f)
        return found[f]

    fine, estimate = 1.0, at(1.0)
    if estimate is None:
        return None, 1.0, len(found)
    while fine / 2 >= MIN_FACTOR:
        coarse = at(fine / 2)
        if coarse is None or coarse * fine / 2 < size.low or coarse <= estimate * _AGREE:
            break  # the coarse pass lost them, saw them below the model's range (merged specks), or agrees
        fine, estimate = fine / 2, coarse  # the finer pass was splintering them
    return estimate, _clamp(size.factor(estimate)), len(found)
