"""Instance-labelled objects (nuclei) as GeoJSON polygons that QuPath imports as detections.

Written for QuPath 0.3-0.7's File > Import objects / drag-and-drop (what it reads is noted below).

:func:`outline` traces a boolean pixel set along its pixel edges; :func:`feature` makes one object's
GeoJSON Feature from its bounding-box crop; :class:`GeoJsonWriter` streams a FeatureCollection to a file
that appears complete under its name or not at all (:func:`unet.atomic.atomic_path`).
"""

# QuPath's GeoJSON reader (qupath-core qupath/lib/io/: PathObjectTypeAdapters.java in v0.3.x,
# QuPathTypeAdapters.java from v0.4): object type from properties.objectType (v0.3: only object_type),
# name from properties.name, measurements as [{"name", "value"}] (all versions; v0.4+ also {name: number}),
# a top-level "id" only as a UUID (else ignored); GsonTools.java (v0.4+) throws on a classification
# object with a name but no "color". Unknown properties are ignored.

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from unet.atomic import AtomicTarget

__all__ = ["GeoJsonWriter", "feature", "outline"]

_Vertex = tuple[int, int]
_Ring = list[list[float]]

# direction codes: 0 +x, 1 +y, 2 -x, 3 -y; (d + 1) % 4 is a left turn in (x, y) as written
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])
_EXACT_INT = 2.0**53  # floats below this that are integral are written as ints


def outline(mask: npt.NDArray[np.bool_]) -> list[list[list[list[float]]]]:
    """The pixel-edge outline of a 2-D boolean pixel set, as GeoJSON polygon coordinates.

    Pixel ``(r, c)`` is the unit square ``[c, c+1] x [r, r+1]`` in ``[x, y]`` = (column, row)
    coordinates. The result is a list of polygons, each a list of closed rings (first vertex ==
    last) holding only the staircase's corners; the polygons' area is exactly ``mask.sum()``.

    Orientation (RFC 7946) is by the signed (shoelace) area of the coordinates as written:
    exterior rings positive (counter-clockwise with y up), holes negative. Images put y down,
    so on screen exteriors run clockwise.

    Connectivity: pixels touching only at a corner are *not* connected. Each 4-connected
    component is one polygon (diagonal neighbours give polygons touching at a point, a
    MultiPolygon), and background enclosed by a component is a hole, also where it reaches
    the outside only through a corner (that hole touches the exterior at a point). Every
    polygon, and the MultiPolygon, is valid in the OGC Simple Features sense.

    Polygons are sorted by their first vertex (the top-left corner of their first pixel in
    raster order), holes likewise; each ring starts at its top-left vertex.

    Args:
        mask: 2-D array, cast to bool.

    Returns:
        ``[polygon, ...]``, ``polygon = [exterior, hole, ...]``, ``ring = [[x, y], ...]``;
        ``[]`` for an empty mask.

    Raises:
        ValueError: if ``mask`` is not 2-D.

    >>> outline(np.array([[1, 1]], dtype=bool))
    [[[[0, 0], [2, 0], [2, 1], [0, 1], [0, 0]]]]
    >>> ring = np.ones((3, 3), dtype=bool)
    >>> ring[1, 1] = False
    >>> outline(ring)
    [[[[0, 0], [3, 0], [3, 3], [0, 3], [0, 0]], [[1, 1], [1, 2], [2, 2], [2, 1], [1, 1]]]]
    >>> len(outline(np.eye(2, dtype=bool)))  # two pixels touching at a corner: two polygons
    2
    """
    return [[_closed(ring) for ring in poly] for poly in _trace(mask, 0, 0)]


def feature(
    object_id: int,
    mask: npt.NDArray[np.bool_],
    y0: int,
    x0: int,
    *,
    classification: str = "Nucleus",
    color: tuple[int, int, int] = (0, 160, 255),
    measurements: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One object as a GeoJSON Feature that QuPath imports as a detection.

    The geometry is :func:`outline` of ``mask`` (the object's bounding-box crop) shifted by
    ``(x0, y0)``, in full-resolution pixel coordinates: a ``Polygon``, or a ``MultiPolygon``
    when the object has parts that touch only at corners. Properties: ``objectType`` (and
    ``object_type`` for QuPath 0.3) ``"detection"``, ``name`` ``str(object_id)``,
    ``object_id``, ``classification`` ``{"name", "color": [r, g, b]}`` and, if given,
    ``measurements`` as ``[{"name": ..., "value": ...}, ...]`` (NaN and infinities as the
    strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, which QuPath parses). No top-level
    ``id``: QuPath takes it for the object's UUID, so it would have to be one.

    Args:
        object_id: The object's label.
        mask: 2-D boolean crop of the object.
        y0: Full-image row of the crop's first row.
        x0: Full-image column of the crop's first column.
        classification: QuPath class name.
        color: The class's RGB colour, 0-255 each.
        measurements: Name -> number, shown in QuPath's measurement table.

    Returns:
        A JSON-serialisable Feature dict.

    Raises:
        ValueError: if ``mask`` is not 2-D or has no pixel, or ``color`` is not 3 values in 0..255.

    >>> f = feature(7, np.ones((1, 1), dtype=bool), 10, 20)
    >>> f["geometry"]
    {'type': 'Polygon', 'coordinates': [[[20, 10], [21, 10], [21, 11], [20, 11], [20, 10]]]}
    >>> f["properties"]["objectType"], f["properties"]["name"]
    ('detection', '7')
    """
    rgb = [int(v) for v in color]
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"color must be 3 values in 0..255, got {color!r}")
    polygons = [[_closed(ring) for ring in poly] for poly in _trace(mask, int(x0), int(y0))]
    if not polygons:
        raise ValueError(f"object {object_id} has no pixels")
    geometry: dict[str, Any] = (
        {"type": "Polygon", "coordinates": polygons[0]}
        if len(polygons) == 1
        else {"type": "MultiPolygon", "coordinates": polygons}
    )
    properties: dict[str, Any] = {
        "objectType": "detection",
        "object_type": "detection",
        "name": str(object_id),
        "object_id": int(object_id),
        "classification": {"name": classification, "color": rgb},
    }
    if measurements:
        properties["measurements"] = [{"name": str(k), "value": _number(v)} for k, v in measurements.items()]
    return {"type": "Feature", "geometry": geometry, "properties": properties}


class GeoJsonWriter:
    """Streams a GeoJSON FeatureCollection to ``path``, one feature at a time.

    Features go to a temporary file beside ``path`` as compact JSON (integral floats written
    as ints), so memory does not grow with their number; :meth:`finish` renames it into place,
    :meth:`abort` deletes it. Also a context manager: finish on a clean exit, abort on an error.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> out = Path(tmp.name) / "nuclei.geojson"
    >>> with GeoJsonWriter(out) as writer:
    ...     writer.add({"type": "Feature", "geometry": None, "properties": {"area": 12.0}})
    >>> out.read_text()
    '{"type":"FeatureCollection","features":[{"type":"Feature","geometry":null,"properties":{"area":12}}]}\\n'
    >>> tmp.cleanup()
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._atomic = AtomicTarget(self._path)
        part = self._atomic.path
        try:
            self._file: IO[str] = open(part, "w", encoding="utf-8")  # noqa: SIM115 (closed in finish/abort)
            self._file.write('{"type":"FeatureCollection","features":[')
        except BaseException:
            with contextlib.suppress(Exception):
                self._file.close()
            self._atomic.discard()
            raise
        self._count = 0
        self._open = True

    @property
    def count(self) -> int:
        """Features added so far."""
        return self._count

    def add(self, feature: dict[str, Any]) -> None:
        """Append one feature (serialised before anything is written, so a bad one writes nothing).

        Raises:
            RuntimeError: after :meth:`finish` or :meth:`abort`.
            ValueError: if it holds NaN or an infinity (not JSON).
        """
        if not self._open:
            raise RuntimeError(f"GeoJSON writer for {self._path} is closed")
        text = json.dumps(_compact(feature), separators=(",", ":"), allow_nan=False)
        self._file.write("," + text if self._count else text)
        self._count += 1

    def close(self) -> None:
        """Write the end of the collection and close the temporary file (nothing renamed yet:
        :meth:`finish` does that, :meth:`abort` still deletes it); on an error nothing is left."""
        if not self._open:
            raise RuntimeError(f"GeoJSON writer for {self._path} is closed")
        if self._file.closed:
            return
        try:
            self._file.write("]}\n")
            self._file.close()
        except BaseException:
            self.abort()
            raise

    def finish(self) -> None:
        """Close the collection and rename the file onto ``path``; on an error nothing is left."""
        self.close()
        self._open = False
        self._atomic.commit()

    def abort(self) -> None:
        """Delete the temporary file (``path`` is left as it was); never raises, may be repeated."""
        if not self._open:
            return
        self._open = False
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(Exception):
            self._atomic.discard()

    def __enter__(self) -> GeoJsonWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def _trace(mask: npt.NDArray[np.bool_], x0: int, y0: int) -> list[list[list[_Vertex]]]:
    """Polygons of rings of corner vertices (not closed), shifted by (x0, y0)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    h, w = m.shape
    if not m.any():
        return []
    p = np.zeros((h + 2, w + 2), dtype=bool)
    p[1:-1, 1:-1] = m
    below, above = p[1:, 1:-1], p[:-1, 1:-1]  # (h+1, w): the horizontal line y = k
    right, left = p[1:-1, 1:], p[1:-1, :-1]  # (h, w+1): the vertical line x = k
    # directed unit edges with the set on their left (in (x, y) as written): start vertex, direction
    k0, c0 = np.nonzero(below & ~above)  # top edges, +x from (c, k)
    r1, k1 = np.nonzero(left & ~right)  # right edges, +y from (k, r)
    k2, c2 = np.nonzero(above & ~below)  # bottom edges, -x from (c+1, k)
    r3, k3 = np.nonzero(right & ~left)  # left edges, -y from (k, r+1)
    sx = np.concatenate([c0, k1, c2 + 1, k3])
    sy = np.concatenate([k0, r1, k2, r3 + 1])
    d = np.repeat(np.arange(4), [len(c0), len(k1), len(c2), len(k3)])
    ex, ey = sx + _DX[d], sy + _DY[d]
    n = len(d)
    stride = w + 1
    out = np.full(((h + 1) * stride, 4), -1, dtype=np.int64)  # out[vertex, direction] = edge
    out[sy * stride + sx, d] = np.arange(n)
    end = ey * stride + ex
    turn_left, straight, turn_right = out[end, (d + 1) % 4], out[end, d], out[end, (d + 3) % 4]
    # at a pinch (two ways on) turn left: hug the pixel being followed, so corner contacts separate
    nxt = np.where(turn_left >= 0, turn_left, np.where(straight >= 0, straight, turn_right))
    pinched = bool(np.any((turn_left >= 0) & (turn_right >= 0)))
    corner = (d[nxt] != d).tolist()
    nxt_l, ex_l, ey_l = nxt.tolist(), (ex + x0).tolist(), (ey + y0).tolist()

    rings: list[list[_Vertex]] = []
    seen = bytearray(n)
    for e0 in range(n):
        if seen[e0]:
            continue
        ring: list[_Vertex] = []
        e = e0
        while not seen[e]:
            seen[e] = 1
            if corner[e]:
                ring.append((ex_l[e], ey_l[e]))
            e = nxt_l[e]
        rings.append(ring)
    if pinched:  # a component touching itself at a corner: cut the loop there (an exterior + a hole)
        rings = [loop for ring in rings for loop in _split_loops(ring)]

    shells: list[tuple[int, list[_Vertex]]] = []
    holes: list[list[_Vertex]] = []
    for traced in rings:
        first = traced.index(min(traced, key=lambda v: (v[1], v[0])))
        loop = traced[first:] + traced[:first]
        area2 = _area2(loop)
        if area2 > 0:
            shells.append((area2, loop))
        else:
            holes.append(loop)
    order = sorted(range(len(shells)), key=lambda i: (shells[i][1][0][1], shells[i][1][0][0]))
    polygons = [[shells[i][1]] for i in order]
    holes.sort(key=lambda r: (r[0][1], r[0][0]))
    if len(polygons) == 1:
        polygons[0] += holes
    elif holes:
        _assign_holes(polygons, [shells[i][0] for i in order], holes)
    return polygons


def _split_loops(ring: list[_Vertex]) -> list[list[_Vertex]]:
    """Cut a cyclic vertex sequence at every repeated vertex into simple loops."""
    loops: list[list[_Vertex]] = []
    stack: list[_Vertex] = []
    at: dict[_Vertex, int] = {}
    for v in ring:
        j = at.get(v)
        if j is None:
            at[v] = len(stack)
            stack.append(v)
        else:
            loops.append(stack[j:])
            for u in stack[j + 1 :]:
                del at[u]
            del stack[j + 1 :]
    loops.append(stack)
    return loops


def _assign_holes(polygons: list[list[list[_Vertex]]], areas2: list[int], holes: list[list[_Vertex]]) -> None:
    """Give each hole to the smallest exterior around it (the one of its own component)."""
    # a point inside each hole: the centre of the background pixel right of its first edge
    pts = []
    for ring in holes:
        (xa, ya), (xb, yb) = ring[0], ring[1]
        ux, uy = (xb > xa) - (xb < xa), (yb > ya) - (yb < ya)
        pts.append((xa + ux / 2 + uy / 2, ya + uy / 2 - ux / 2))
    px, py = np.array(pts).T
    owner = np.full(len(holes), -1)
    for i in sorted(range(len(polygons)), key=areas2.__getitem__):
        a = np.array(polygons[i][0])
        b = np.roll(a, -1, axis=0)
        vertical = a[:, 0] == b[:, 0]
        x, lo, hi = (
            a[vertical, 0],
            np.minimum(a[vertical, 1], b[vertical, 1]),
            np.maximum(a[vertical, 1], b[vertical, 1]),
        )
        crossings = ((x > px[:, None]) & (lo < py[:, None]) & (py[:, None] < hi)).sum(axis=1)
        owner[(owner < 0) & (crossings % 2 == 1)] = i
    for ring, i in zip(holes, owner.tolist(), strict=True):
        if i < 0:
            raise RuntimeError("a hole outside every exterior ring (a bug in shapes._trace)")
        polygons[i].append(ring)


def _area2(ring: list[_Vertex]) -> int:
    """Twice the signed (shoelace) area of a ring."""
    return sum(xa * yb - xb * ya for (xa, ya), (xb, yb) in zip(ring, ring[1:] + ring[:1], strict=True))


def _closed(ring: list[_Vertex]) -> _Ring:
    coords: _Ring = [[x, y] for x, y in ring]
    coords.append(coords[0][:])
    return coords


def _number(v: float) -> float | str:
    """A measurement value for QuPath: a float, or its spelling of NaN and the infinities."""
    x = float(v)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _compact(o: Any) -> Any:
    """``o`` with integral floats as ints and numpy scalars/arrays as Python values."""
    if isinstance(o, float):
        return int(o) if o.is_integer() and abs(o) < _EXACT_INT else o
    if isinstance(o, dict):
        return {k: _compact(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_compact(v) for v in o]
    if isinstance(o, np.ndarray):
        return _compact(o.tolist())
    if isinstance(o, np.generic):
        return _compact(o.item())
    return o
