"""NGFF metadata shared by :mod:`.source` and :mod:`.sink`: formats, axis letters and order,
units, the label palette and name rule, and helpers that read and check a store's metadata."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ome_zarr.format import Format, FormatV04, FormatV05

from ..errors import CorruptImageError, UnsupportedImageError

__all__ = [  # private to the package: what source.py and sink.py use
    "_FORMATS",
    "_LABEL_NAME",
    "_LETTER",
    "_RANK",
    "_UM_PER_UNIT",
    "_json",
    "_labels_list",
    "_level_factors",
    "_ngff_version",
    "_scale_and_translation",
    "_zarr_format",
]

_FORMATS: dict[str, Format] = {"0.4": FormatV04(), "0.5": FormatV05()}
_LETTER = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}  # NGFF axis name -> header letter
_RANK = {"T": 0, "C": 1, "S": 1, "Z": 2, "Y": 3, "X": 4}  # NGFF order: time, channel, space (z, y, x)
_UM_PER_UNIT = {
    "angstrom": 1e-4,
    "picometer": 1e-6,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "um": 1.0,
    "µm": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "decimeter": 1e5,
    "meter": 1e6,
    "inch": 25400.0,
    "foot": 304800.0,
}
_LABEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _zarr_format(path: Path) -> int:
    if (path / "zarr.json").is_file():
        return 3
    if (path / ".zgroup").is_file() or (path / ".zattrs").is_file():
        return 2
    raise CorruptImageError(f"not an OME-Zarr store: {path.name} holds no zarr group (no zarr.json or .zgroup)")


def _ngff_version(path: Path, zarr_format: int, attrs: Mapping[str, Any]) -> str:
    """The NGFF version the image group's metadata declares, refused unless 0.4 on Zarr v2 or 0.5 on v3."""
    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        if "plate" in attrs or "well" in attrs:
            kind = "an HCS plate" if "plate" in attrs else "an HCS well"
            raise UnsupportedImageError(f"{path.name} is {kind}; segment one image of it (a field group)")
        if "bioformats2raw.layout" in attrs:
            raise UnsupportedImageError(
                f"{path.name} is a bioformats2raw collection of images; segment one of them, e.g. {path.name}/0"
            )
        raise UnsupportedImageError(f"{path.name} is a zarr group but not an OME-Zarr image (no multiscales metadata)")
    declared = attrs.get("version") if zarr_format == 3 else multiscales[0].get("version", "0.4")
    if str(declared) != ("0.5" if zarr_format == 3 else "0.4"):
        what = f"OME-Zarr version {declared}" if declared is not None else "no OME-Zarr version"
        raise UnsupportedImageError(
            f"{path.name} declares {what} on Zarr v{zarr_format}; expected 0.4 (Zarr v2) or 0.5 (Zarr v3)"
        )
    return str(declared)


def _scale_and_translation(transforms: Any, ndim: int, where: str) -> tuple[list[float], list[float]]:
    """The ``scale`` and ``translation`` (zeros if absent) of a validated transformation list."""
    scale: list[float] = [1.0] * ndim
    translation: list[float] = [0.0] * ndim
    for t in transforms or []:
        values = t.get("scale") if t.get("type") == "scale" else t.get("translation")
        if t.get("type") not in ("scale", "translation"):
            continue
        if not isinstance(values, list) or len(values) != ndim:
            raise CorruptImageError(f"OME-Zarr {where}: {t.get('type')} {values!r} must list {ndim} numbers")
        numbers = [float(v) for v in values]
        if not all(math.isfinite(v) for v in numbers):
            raise CorruptImageError(f"OME-Zarr {where}: {t.get('type')} {values!r} must be finite")
        if t["type"] == "scale":
            if not all(v > 0 for v in numbers):
                raise CorruptImageError(f"OME-Zarr {where}: scale {values!r} must be positive")
            scale = numbers
        else:
            translation = numbers
    return scale, translation


def _level_factors(shapes: Sequence[tuple[int, int]]) -> list[int] | None:
    """The whole y/x downsampling factor of each level from the (y, x) level shapes, or None
    when some level is no such downsampling of level 0 (anisotropic, or not whole).

    >>> _level_factors([(100, 130), (50, 65), (25, 32)]), _level_factors([(100, 100), (50, 100)])
    ([1, 2, 4], None)
    """
    (h, w), factors = shapes[0], []
    for lh, lw in shapes:
        f = max(1, round(h / max(lh, 1)))
        if round(w / max(lw, 1)) != f or lh not in (h // f, -(-h // f)) or lw not in (w // f, -(-w // f)):
            return None
        factors.append(f)
    return factors if all(a < b for a, b in itertools.pairwise(factors)) else None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _labels_list(labels_dir: Path, zarr_format: int) -> list[str]:
    """The ``labels`` list of a labels group, read from its metadata file (empty if none)."""
    attrs = _json(labels_dir / ".zattrs") if zarr_format == 2 else _json(labels_dir / "zarr.json")
    if zarr_format == 3:
        attrs = attrs.get("attributes", {}).get("ome", {})
    listed = attrs.get("labels", []) if isinstance(attrs, dict) else []
    return [str(n) for n in listed] if isinstance(listed, list) else []
