"""Instance labels from a class mask: every object its own id, the same however it was tiled.

The rule (:class:`InstanceRule`), on the whole class mask:

1. **Seeds**: the 4-connected components of the seed classes (the demo model: ``nucleus``).
2. **Growth**: up to ``grow_px`` steps, each unassigned pixel of a grow class (``boundary``)
   that has an assigned 4-neighbour takes that neighbour's object; when several have one, the
   first of up, left, right, down wins. So the contact line between two nuclei is split
   between them, and grow-class pixels out of reach of every seed stay background.
3. **Small fragments**: objects of fewer than ``min_area`` pixels become background.
4. **Holes**: each 4-connected region of background that does not touch the image border and
   borders exactly one object is filled into it ("nuclei are simply connected").
5. **Ids**: objects numbered 1..N in raster order of their first pixel (top row first, then
   leftmost), so the ids are a function of the mask alone.

:func:`label_instances` applies it to a whole mask. :class:`InstanceLabeller` applies it to
bands of rows, top to bottom, with memory O(band x width) plus a record per object: seeds that
cross a band seam are joined by a union-find over the seam rows, the growth is run with
``grow_px`` rows of context on both sides, background regions are joined the same way, and
the provisional ids go to a :class:`Spool` (in memory, or zlib-compressed in a temporary
file). :meth:`InstanceLabeller.finish` resolves the unions and returns a :class:`Relabel`,
whose :meth:`~Relabel.bands` give the final ids band by band. Nothing in the result depends
on where the bands were cut: ``tests/tiling/test_instances.py`` checks it against
:func:`label_instances` on constructed cases and random masks.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import TilingError

__all__ = [
    "InstanceLabeller",
    "InstanceRule",
    "Relabel",
    "Spool",
    "label_instances",
]

_FOUR = ndimage.generate_binary_structure(2, 1)
_BG = np.uint32(1 << 31)  # spool values with this bit are background regions, not objects
_CHUNK_PX = 1 << 20  # pixels per spool chunk
# growth: the neighbour (dy, dx) looked at first wins: up, left, right, down
_ORDER = ((-1, 0), (0, -1), (0, 1), (1, 0))


@dataclass(frozen=True)
class InstanceRule:
    """How a class mask becomes instances (see the module docstring for the steps).

    >>> InstanceRule.from_dict({"seeds": [1], "grow": [2], "min_area": 10})
    InstanceRule(seeds=(1,), grow=(2,), min_area=10, grow_px=4, fill_holes=True)
    """

    seeds: tuple[int, ...] = (1,)  # classes whose connected components are the objects
    grow: tuple[int, ...] = ()  # classes the objects grow into (a boundary class)
    min_area: int = 0  # objects smaller than this (px, before hole filling) are dropped
    grow_px: int = 4  # the most steps an object grows into the grow classes
    fill_holes: bool = True

    def __post_init__(self) -> None:
        if not self.seeds:
            raise TilingError("an instance rule needs at least one seed class")
        if set(self.seeds) & set(self.grow):
            raise TilingError(f"seed classes {self.seeds} and grow classes {self.grow} overlap")
        if any(not 0 < c < 256 for c in (*self.seeds, *self.grow)):
            raise TilingError(f"classes must be 1..255, got seeds {self.seeds}, grow {self.grow}")
        if self.min_area < 0 or self.grow_px < 0:
            raise TilingError(f"min_area and grow_px must be >= 0, got {self.min_area}, {self.grow_px}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InstanceRule:
        known = {"seeds", "grow", "min_area", "grow_px", "fill_holes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TilingError(f"unknown instance rule fields: {unknown}")
        fields: dict[str, Any] = dict(data)
        for key in ("seeds", "grow"):
            if key in fields:
                fields[key] = tuple(int(c) for c in fields[key])
        for key in ("min_area", "grow_px"):
            if key in fields:
                fields[key] = int(fields[key])
        if "fill_holes" in fields:
            fields["fill_holes"] = bool(fields["fill_holes"])
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"], d["grow"] = list(self.seeds), list(self.grow)
        return d


def _shifted(a: npt.NDArray[Any], dy: int, dx: int) -> npt.NDArray[Any]:
    """``out[y, x] = a[y + dy, x + dx]``, 0 outside."""
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = a[ys, xs]
    return out


def _grow(ids: npt.NDArray[Any], growable: npt.NDArray[np.bool_], steps: int) -> npt.NDArray[Any]:
    """Step 2 of the rule on a window: every step looks only at the 4-neighbours, so rows
    more than ``steps`` away from the window's cut edges come out as on the whole image.
    Works on the open grow-class pixels only (a few per cent of an image)."""
    ids = ids.copy()
    h, w = ids.shape
    ys, xs = np.nonzero(growable & (ids == 0))
    for _ in range(steps):
        if not len(ys):
            break
        new = np.zeros(len(ys), ids.dtype)
        for dy, dx in _ORDER:
            y2, x2 = ys + dy, xs + dx
            inside = (y2 >= 0) & (y2 < h) & (x2 >= 0) & (x2 < w)
            nb = np.zeros(len(ys), ids.dtype)
            nb[inside] = ids[y2[inside], x2[inside]]
            take = (new == 0) & (nb > 0)
            new[take] = nb[take]
        got = new > 0
        if not got.any():
            break
        ids[ys[got], xs[got]] = new[got]  # all at once: a step sees only the pixels assigned before it
        ys, xs = ys[~got], xs[~got]
    return ids


def _classes(labels: npt.NDArray[Any], classes: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    if not classes:
        return np.zeros(labels.shape, bool)
    return np.isin(labels, np.asarray(classes, labels.dtype))


def label_instances(labels: npt.NDArray[Any], rule: InstanceRule) -> npt.NDArray[np.uint32]:
    """The rule applied to a whole (Y, X) class mask: uint32, 0 = background, objects 1..N.

    >>> m = np.array([[1, 1, 2, 1, 1], [1, 1, 2, 1, 1], [0, 0, 0, 0, 1]], np.uint8)
    >>> label_instances(m, InstanceRule(grow=(2,))).tolist()
    [[1, 1, 1, 2, 2], [1, 1, 1, 2, 2], [0, 0, 0, 0, 2]]
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise TilingError(f"expected a (Y, X) class mask, got shape {labels.shape}")
    seeds, _ = ndimage.label(_classes(labels, rule.seeds), structure=_FOUR)
    ids = _grow(np.asarray(seeds, np.int64), _classes(labels, rule.grow), rule.grow_px)
    if rule.min_area:
        area = np.bincount(ids.ravel())
        small = area < rule.min_area
        small[0] = False
        ids[small[ids]] = 0
    if rule.fill_holes:
        void, n = ndimage.label(ids == 0, structure=_FOUR)
        if n:
            pairs = np.concatenate(
                [np.stack([void.ravel(), _shifted(ids, dy, dx).ravel()]) for dy, dx in _ORDER], axis=1
            )
            pairs = np.unique(pairs[:, (pairs[0] > 0) & (pairs[1] > 0)], axis=1)  # (region, object) that touch
            touching = np.bincount(pairs[0], minlength=n + 1)
            fill = np.zeros(n + 1, np.int64)
            fill[pairs[0]] = pairs[1]
            fill[touching != 1] = 0
            fill[np.unique(np.concatenate([void[0], void[-1], void[:, 0], void[:, -1]]))] = 0
            fill[0] = 0
            ids = np.where(void > 0, fill[void], ids)
    return _canonical(ids)


def _canonical(ids: npt.NDArray[Any]) -> npt.NDArray[np.uint32]:
    values, first = np.unique(ids.ravel(), return_index=True)
    keep = values > 0
    values, first = values[keep], first[keep]
    order = np.argsort(first, kind="stable")
    lut = np.zeros(int(values.max()) + 1 if len(values) else 1, np.uint32)
    lut[values[order]] = np.arange(1, len(values) + 1, dtype=np.uint32)
    return np.asarray(lut[ids], np.uint32)


class _Grow:
    """A growable record per provisional id (index 0 unused)."""

    def __init__(self, fill: int, dtype: npt.DTypeLike = np.int64) -> None:
        self.fill, self.dtype = fill, np.dtype(dtype)
        self.a = np.full(1024, fill, self.dtype)

    def reserve(self, n: int) -> None:
        if n > len(self.a):
            extra = np.full(max(n, len(self.a) * 3 // 2) - len(self.a), self.fill, self.dtype)
            self.a = np.concatenate([self.a, extra])


class _UnionFind:
    """Union-find over provisional ids 1..n (0 = none); unions come a seam at a time."""

    def __init__(self) -> None:
        self.parent = _Grow(0, np.int32)
        self.n = 0

    def extend(self, n: int) -> None:
        self.parent.reserve(self.n + n + 1)
        self.parent.a[self.n + 1 : self.n + n + 1] = np.arange(self.n + 1, self.n + n + 1)
        self.n += n

    def _find(self, x: int) -> int:
        p = self.parent.a
        while p[x] != x:
            p[x] = p[p[x]]
            x = int(p[x])
        return x

    def union(self, a: npt.NDArray[Any], b: npt.NDArray[Any]) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self.parent.a[max(rx, ry)] = min(rx, ry)

    def resolve(self) -> npt.NDArray[np.int32]:
        """The root of every id 0..n, by pointer jumping in the parent array itself (which
        this spends: no further unions)."""
        p = self.parent.a[: self.n + 1]
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p[:] = q
            del q


class Spool:
    """uint32 row chunks kept in order: in memory, or zlib-compressed in a temporary file in
    ``directory`` (deleted by :meth:`close`). Label images compress many times over, so a
    streamed image's provisional ids take a fraction of its size on disk."""

    def __init__(self, width: int, directory: str | os.PathLike[str] | None = None) -> None:
        self.width = width
        self._chunks: list[tuple[int, int, int]] = []  # (first row, rows, end offset | index)
        self._end = 0
        self._memory: list[npt.NDArray[np.uint32]] = []
        self._file: Any = None
        self._path: Path | None = None
        self.rows = 0
        if directory is not None:
            fd, name = tempfile.mkstemp(dir=directory, prefix=".instances", suffix=".spool")
            self._path, self._file = Path(name), os.fdopen(fd, "w+b")

    def write(self, rows: npt.NDArray[np.uint32]) -> None:
        if not len(rows):
            return
        if self._file is None:
            self._memory.append(np.ascontiguousarray(rows, np.uint32))
            self._chunks.append((self.rows, len(rows), len(self._memory) - 1))
        else:
            data = zlib.compress(np.ascontiguousarray(rows, np.uint32).tobytes(), 1)
            self._file.seek(self._end)
            self._file.write(data)
            self._end += len(data)
            self._chunks.append((self.rows, len(rows), self._end))  # the chunk's end offset
        self.rows += len(rows)

    @property
    def spans(self) -> list[tuple[int, int]]:
        """``(first row, rows)`` of each chunk, in order."""
        return [(y0, n) for y0, n, _ in self._chunks]

    def chunk(self, k: int) -> npt.NDArray[np.uint32]:
        """Chunk ``k``'s rows."""
        _, n, ref = self._chunks[k]
        if self._file is None:
            return self._memory[ref]
        self._file.flush()
        start = self._chunks[k - 1][2] if k else 0
        self._file.seek(start)
        data = zlib.decompress(self._file.read(ref - start))
        return np.frombuffer(data, np.uint32).reshape(n, self.width)

    def chunks(self) -> Iterator[tuple[int, npt.NDArray[np.uint32]]]:
        """``(first row, rows)`` in order."""
        for k, (y0, _, _) in enumerate(self._chunks):
            yield y0, self.chunk(k)

    def close(self) -> None:
        """Free the chunks and delete the file; never raises."""
        self._memory.clear()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            assert self._path is not None
            self._path.unlink(missing_ok=True)
            self._file = None


@dataclass(frozen=True)
class Relabel:
    """Provisional ids -> final ids, from :meth:`InstanceLabeller.finish`."""

    count: int  # objects, 1..count
    objects: npt.NDArray[np.uint32]  # provisional object id -> final id (0: dropped)
    regions: npt.NDArray[np.uint32]  # provisional background id -> the id of the object it fills, or 0
    spool: Spool

    def apply(self, values: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        bg = (values & _BG) != 0
        out = self.objects[np.where(bg, 0, values)]
        if bg.any():
            out[bg] = self.regions[values[bg] & ~_BG]
        return out

    def bands(self) -> Iterator[tuple[int, npt.NDArray[np.uint32]]]:
        """``(first row, final ids)`` top to bottom."""
        for y0, values in self.spool.chunks():
            yield y0, self.apply(values)


class InstanceLabeller:
    """:func:`label_instances` over bands of a (Y, X) class mask of ``shape``, top to bottom.

    ``add(band)`` each band (any number of rows), then :meth:`finish`. Held: the rows that
    the growth still needs (``grow_px`` above and below the rows being decided), one row of
    the last band decided, and a few numbers per provisional object and background piece;
    the decided rows go to ``spool``.

    >>> m = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0]], np.uint8)
    >>> lab = InstanceLabeller(m.shape, InstanceRule())
    >>> for y in range(4):
    ...     lab.add(m[y : y + 1])
    >>> relabel = lab.finish()
    >>> relabel.count, np.concatenate([b for _, b in relabel.bands()]).tolist()[0]
    (1, [1, 0, 1])
    """

    def __init__(self, shape: tuple[int, int], rule: InstanceRule, spool: Spool | None = None) -> None:
        self.height, self.width = shape
        self.rule = rule
        self.spool = spool if spool is not None else Spool(self.width)
        self._objects = _UnionFind()
        self._regions = _UnionFind()
        self._first = _Grow(np.iinfo(np.int64).max)  # per object: flat index of its first pixel
        self._area = _Grow(0, np.int32)  # per object: pixels
        self._border = _Grow(0, np.int8)  # per object: touches the image border, or a background piece that does
        self._region_border = _Grow(0, np.int8)
        # (2, k) node pairs that touch; object id > 0, region -id: objects and background pieces
        # off the border, objects that may be dropped
        self._edges: list[npt.NDArray[np.int32]] = []
        self._rows_in = 0
        self._done = 0  # rows decided (spooled)
        self._ctx_y0 = 0
        self._ctx_labels = np.zeros((0, self.width), np.uint8)
        self._ctx_seeds = np.zeros((0, self.width), np.int32)
        self._last: tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]] | None = None  # last decided row

    def add(self, band: npt.NDArray[Any]) -> None:
        band = np.asarray(band)
        if band.ndim != 2 or band.shape[1] != self.width:
            raise TilingError(f"expected bands of width {self.width}, got shape {band.shape}")
        if self._rows_in + len(band) > self.height:
            raise TilingError(f"more than the {self.height} rows of the image were added")
        if not len(band):
            return
        local, n = ndimage.label(_classes(band, self.rule.seeds), structure=_FOUR)
        if self._objects.n + n >= int(_BG):
            raise TilingError("more than 2**31 provisional objects in one image")
        seeds = np.where(local > 0, local + np.int32(self._objects.n), np.int32(0)).astype(np.int32)
        del local
        self._objects.extend(n)
        if len(self._ctx_seeds):  # seeds that cross the seam are one
            above, below = self._ctx_seeds[-1], seeds[0]
            both = (above > 0) & (below > 0)
            if both.any():
                pairs = np.unique(np.stack([above[both], below[both]]), axis=1)
                self._objects.union(pairs[0], pairs[1])
        self._ctx_labels = np.concatenate([self._ctx_labels, band.astype(np.uint8, copy=False)])
        self._ctx_seeds = np.concatenate([self._ctx_seeds, seeds])
        self._rows_in += len(band)
        g = self.rule.grow_px
        end = self.height if self._rows_in == self.height else self._rows_in - g
        if end > self._done:
            grown = _grow(self._ctx_seeds, _classes(self._ctx_labels, self.rule.grow), g) if g else self._ctx_seeds
            self._decide(grown[self._done - self._ctx_y0 : end - self._ctx_y0], self._done)
            self._done = end
        keep_from = min(max(0, self._done - g), self._rows_in - 1)
        cut = keep_from - self._ctx_y0
        self._ctx_labels, self._ctx_seeds = self._ctx_labels[cut:].copy(), self._ctx_seeds[cut:].copy()
        self._ctx_y0 = keep_from

    def _decide(self, ids: npt.NDArray[np.int32], y0: int) -> None:
        """Rows ``y0...`` of grown provisional ids are final: record, join regions, spool."""
        w = ids.shape[1]
        n = self._objects.n + 1
        for rec in (self._first, self._area, self._border):
            rec.reserve(n)
        flat = ids.ravel()
        where = np.flatnonzero(flat)
        values = flat[where]
        found, first = np.unique(values, return_index=True)
        self._first.a[found] = np.minimum(self._first.a[found], where[first] + y0 * w)
        lo = int(found[0]) if len(found) else 0
        counts = np.bincount(values - lo) if len(found) else np.zeros(0, np.int64)
        self._area.a[lo : lo + len(counts)] += counts
        del where, values
        self._border.a[self._edge_values(ids, y0)] = 1
        # background pieces of these rows: regions, joined to the rows above across the seam
        local, nr = ndimage.label(ids == 0, structure=_FOUR)
        regions = np.where(local > 0, local + np.int32(self._regions.n), np.int32(0)).astype(np.int32)
        del local
        self._regions.extend(nr)
        self._region_border.reserve(self._regions.n + 1)
        self._region_border.a[self._edge_values(regions, y0)] = 1
        if self._last is not None:
            above_ids, above_regions = self._last
            both = (above_regions > 0) & (regions[0] > 0)
            if both.any():
                pairs = np.unique(np.stack([above_regions[both], regions[0][both]]), axis=1)
                self._regions.union(pairs[0], pairs[1])
            touching = self._touch(above_ids, above_regions, ids[0], regions[0])
        else:
            touching = []
        touching += self._touch(ids[:, :-1], regions[:, :-1], ids[:, 1:], regions[:, 1:])
        touching += self._touch(ids[:-1], regions[:-1], ids[1:], regions[1:])
        got = np.concatenate(touching, axis=1)
        if got.shape[1]:
            self._edges.append(np.unique(got, axis=1))
        del touching, got
        self._last = (ids[-1].copy(), regions[-1].copy())
        if self._objects.n >= int(_BG) or self._regions.n >= int(_BG):
            raise TilingError("more than 2**31 provisional objects in one image")
        step = max(1, _CHUNK_PX // w)  # small chunks: reading them back stays a few MB at a time
        for r in range(0, len(ids), step):
            spooled = regions[r : r + step].view(np.uint32) | _BG
            np.copyto(spooled, ids[r : r + step].view(np.uint32), where=ids[r : r + step] > 0)
            self.spool.write(spooled)

    def _edge_values(self, a: npt.NDArray[Any], y0: int) -> npt.NDArray[Any]:
        """The non-zero ids of ``a`` (rows ``y0...``) on the image's border."""
        edge = [a[:, 0], a[:, -1]]
        if y0 == 0:
            edge.append(a[0])
        if y0 + len(a) == self.height:
            edge.append(a[-1])
        values = np.unique(np.concatenate(edge))
        return values[values > 0]

    def _touch(
        self,
        a_ids: npt.NDArray[np.int32],
        a_regions: npt.NDArray[np.int32],
        b_ids: npt.NDArray[np.int32],
        b_regions: npt.NDArray[np.int32],
    ) -> list[npt.NDArray[np.int32]]:
        """What touches across neighbour pairs (a, b), as (2, k) pairs: objects and background pieces
        (a piece on the image border is never a hole: an object beside one is marked instead
        of the pair), and objects that touch another while either might still be dropped."""
        border = self._region_border.a
        pairs = []
        for obj, reg in ((a_ids, b_regions), (b_ids, a_regions)):
            sel = (obj > 0) & (reg > 0)
            o, r = obj[sel], reg[sel]
            on_border = border[r] > 0
            self._border.a[o[on_border]] = 1
            pairs.append(np.stack([o[~on_border], -r[~on_border]]).astype(np.int32))
        if self.rule.min_area:
            sel = (a_ids > 0) & (b_ids > 0) & (a_ids != b_ids)
            o1, o2 = a_ids[sel], b_ids[sel]
            small = self._area.a[o1] < self.rule.min_area
            small |= self._area.a[o2] < self.rule.min_area
            pairs.append(np.stack([o1[small], o2[small]]).astype(np.int32))
        return pairs

    def finish(self) -> Relabel:
        """All rows were added: resolve the unions, drop small objects, fill holes, number them.

        Memory: the records of the bands are spent in place (the union-find's parents become
        the roots, the areas and first pixels are summed into the roots) and each is freed
        once used, so the peak is a few bytes per provisional object over them; only the
        pieces off the border (a border piece is never a hole) take part in the void graph."""
        if self._rows_in != self.height:
            raise TilingError(f"{self._rows_in} of the image's {self.height} rows were added")
        n_obj, n_reg = self._objects.n, self._regions.n
        # objects: the root of each provisional id, and the root's area, first pixel and border flag
        root = self._objects.resolve()  # int32
        area, first = self._area.a[: n_obj + 1], self._first.a[: n_obj + 1]
        border = self._border.a[: n_obj + 1]
        self._objects, self._area, self._first, self._border = _UnionFind(), _Grow(0), _Grow(0), _Grow(0)
        _into_roots(root, area, first, border)
        kept = area >= max(self.rule.min_area, 1)  # the pieces that are not roots have no area now
        dropped = (area > 0) & ~kept
        kept[0] = dropped[0] = False
        del area
        # background pieces: roots, and whether each root's piece touches the image border
        rroot = self._regions.resolve()
        rborder = self._region_border.a[: n_reg + 1]
        self._regions, self._region_border = _UnionFind(), _Grow(0)
        _into_roots(rroot, None, None, rborder)
        # the recorded pairs as roots: objects > 0, regions < 0
        edges = np.concatenate(self._edges, axis=1) if self._edges else np.zeros((2, 0), np.int32)
        self._edges = []
        for row in edges:  # to roots, in place (int32: two copies of the pairs at most)
            obj = row > 0
            row[obj] = root[row[obj]]
            row[~obj] = -rroot[-row[~obj]]
        # a dropped object beside a piece that turned out to touch the border is in a border void
        on_border = (edges < 0) & (rborder[np.clip(-edges, 0, None)] > 0)
        hit = on_border[::-1] & (edges > 0)  # the object end of a pair whose region end is on the border
        border[edges[hit]] = 1
        edges = edges[:, ~on_border.any(axis=0)]
        del on_border, hit
        # voids: dropped objects and off-border region roots, joined where they touch
        region_roots = np.flatnonzero((rroot == np.arange(n_reg + 1, dtype=rroot.dtype)) & (rborder == 0))
        region_roots = region_roots[region_roots > 0]
        del rborder
        dropped_ids = np.flatnonzero(dropped)
        nd = len(dropped_ids)
        nv = nd + len(region_roots)

        def void_of(e: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
            """The void node of each pair end (-1: a kept object)."""
            out = _position(dropped_ids, e)
            regs = e < 0
            at = _position(region_roots, -e[regs])
            out[regs] = np.where(at >= 0, at + nd, -1)
            return out

        va, vb = void_of(edges[0]), void_of(edges[1])
        void = np.zeros(0, np.int32)
        if nv:
            both = (va >= 0) & (vb >= 0)
            graph = coo_matrix((np.ones(int(both.sum()), np.int8), (va[both], vb[both])), shape=(nv, nv))
            del both
            void = np.asarray(connected_components(graph, directed=False)[1], np.int32)
            del graph
        nvoid = int(void.max()) + 1 if nv else 0
        vborder = np.zeros(nvoid, bool)
        if nd:
            vborder[void[:nd][border[dropped_ids] > 0]] = True
        del border, dropped
        owner = np.zeros(nvoid, np.int64)  # the one kept object around a void, else 0
        if self.rule.fill_holes and nvoid:
            low = np.full(nvoid, np.iinfo(np.int32).max, np.int32)
            high = np.zeros(nvoid, np.int32)
            for obj_end, other in ((edges[0], vb), (edges[1], va)):  # (kept object, void) pairs
                ok = (obj_end > 0) & kept[np.clip(obj_end, 0, None)] & (other >= 0)
                touch_void, touch_obj = void[other[ok]], obj_end[ok]
                del ok
                np.minimum.at(low, touch_void, touch_obj)  # one object around it: its lowest and highest agree
                np.maximum.at(high, touch_void, touch_obj)
                del touch_void, touch_obj
            owner[:] = np.where((high > 0) & (low == high) & ~vborder, high, 0)
            del low, high
        del edges, va, vb, vborder
        # canonical numbering of the kept objects: by first pixel (the ids' own order when no
        # growth reached above or left of a seed)
        kept_ids = np.flatnonzero(kept).astype(np.int32)
        del kept
        keys = first[kept_ids]
        del first
        if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            order = np.argsort(keys, kind="stable")
            del keys
            kept_ids = kept_ids[order]
            del order
        else:
            del keys
        count = len(kept_ids)
        final = np.zeros(n_obj + 1, np.uint32)
        final[kept_ids] = np.arange(1, count + 1, dtype=np.uint32)
        del kept_ids
        void_final = final[owner]  # a void's fill: its owner's final id, or 0
        if nd:
            final[dropped_ids] = void_final[void[:nd]]
        obj_lut = final[root]
        del final, root
        region_final = np.zeros(n_reg + 1, np.uint32)
        region_final[region_roots] = void_final[void[nd:]]
        reg_lut = region_final[rroot]
        del region_final, rroot
        obj_lut[0] = reg_lut[0] = 0
        return Relabel(count, obj_lut, reg_lut, self.spool)


def _into_roots(
    root: npt.NDArray[np.int32],
    area: npt.NDArray[Any] | None,
    first: npt.NDArray[Any] | None,
    flag: npt.NDArray[Any] | None,
) -> None:
    """Sum each id's record into its root's, in place: ``area`` added (then 0 off the roots),
    ``first`` the minimum, ``flag`` set where any of the root's ids has it."""
    moved = np.flatnonzero(root != np.arange(len(root), dtype=root.dtype))
    if not len(moved):
        return
    to = root[moved]
    if area is not None:
        np.add.at(area, to, area[moved])
        area[moved] = 0
    if first is not None:
        np.minimum.at(first, to, first[moved])
    if flag is not None:
        flag[to[flag[moved] > 0]] = 1


def _position(ids: npt.NDArray[Any], values: npt.NDArray[Any]) -> npt.NDArray[np.int32]:
    """The index of each value in the sorted ``ids``, or -1 where it is not one of them."""
    out = np.full(len(values), -1, np.int32)
    if len(ids):
        at = np.minimum(np.searchsorted(ids, values), len(ids) - 1)
        hit = ids[at] == values
        out[hit] = at[hit]
    return out
