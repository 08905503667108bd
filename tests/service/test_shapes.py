"""service.shapes: pixel-edge polygons that are valid, exact and QuPath-importable, and the streaming writer."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from service.shapes import GeoJsonWriter, feature, outline

shapely = pytest.importorskip("shapely")
shape = shapely.geometry.shape

Mask = npt.NDArray[np.bool_]


def signed_area(ring: list[list[float]]) -> float:
    """Shoelace area of a closed ring in (x, y) as written: > 0 is counter-clockwise (RFC 7946 exterior)."""
    return sum(xa * yb - xb * ya for (xa, ya), (xb, yb) in itertools.pairwise(ring)) / 2


def polygons_of(geometry: dict[str, Any]) -> list[list[list[list[float]]]]:
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def check(mask: Mask, y0: int = 0, x0: int = 0) -> Any:
    """Every property outline/feature promise, for one mask; returns the shapely geometry."""
    f = feature(5, mask, y0, x0)
    geometry = f["geometry"]
    polys = polygons_of(geometry)
    assert geometry["type"] == ("Polygon" if len(polys) == 1 else "MultiPolygon")
    # one polygon per 4-connected component (diagonal contacts separate)
    assert len(polys) == ndimage.label(mask)[1]
    for poly in polys:
        for i, ring in enumerate(poly):
            assert ring[0] == ring[-1] and len(ring) >= 5
            assert all(isinstance(v, int) for pt in ring for v in pt)
            assert (signed_area(ring) > 0) == (i == 0), "exterior CCW, holes CW in (x, y) as written"
            pts = np.array(ring[:-1])
            steps = np.roll(pts, -1, axis=0) - pts
            assert (np.count_nonzero(steps, axis=1) == 1).all(), "axis-parallel edges, no repeated vertex"
            turns = steps[:, 0] * np.roll(steps, 1, axis=0)[:, 1] - steps[:, 1] * np.roll(steps, 1, axis=0)[:, 0]
            assert (turns != 0).all(), "collinear vertices removed"
            assert len({tuple(p) for p in ring[:-1]}) == len(ring) - 1, "rings are simple"
    g = shape(geometry)
    assert g.is_valid, shapely.is_valid_reason(g)
    assert g.area == mask.sum()
    rows, cols = np.nonzero(np.ones(mask.shape, dtype=bool))
    inside = shapely.contains_xy(g, cols + x0 + 0.5, rows + y0 + 0.5)
    np.testing.assert_array_equal(inside.reshape(mask.shape), mask)
    # outline is the same geometry, unshifted
    shifted = [[[[x - x0, y - y0] for x, y in ring] for ring in poly] for poly in polys]
    assert outline(mask) == shifted
    return g


# -- random and constructed shapes ------------------------------------------------------------------------------

small_masks = arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12)))


@settings(max_examples=300, deadline=None)
@given(small_masks, st.sampled_from(["raw", "open", "close", "smooth"]))
def test_random_masks_are_valid_and_exact(mask: Mask, how: str) -> None:
    if how == "open":
        mask = ndimage.binary_opening(mask)
    elif how == "close":
        mask = ndimage.binary_closing(mask)
    elif how == "smooth":
        mask = ndimage.uniform_filter(mask.astype(float), 3, mode="constant") > 0.45
    if mask.any():
        check(mask)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(8, 60),
    st.integers(1, 12),
    st.integers(0, 10),
    st.integers(0, 2**32 - 1),
)
def test_grown_blobs_are_valid_and_exact(size: int, seeds: int, grow: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), dtype=bool)
    mask[rng.integers(0, size, seeds), rng.integers(0, size, seeds)] = True
    mask = ndimage.binary_dilation(mask, iterations=grow) if grow else mask
    mask &= rng.random(mask.shape) > 0.05  # pepper: holes and pinch points
    if mask.any():
        check(mask, int(rng.integers(0, 10_000)), int(rng.integers(0, 10_000)))


@settings(max_examples=25, deadline=None)
@given(st.floats(0.5, 60), st.floats(-0.5, 0.5), st.floats(-0.5, 0.5))
def test_discs_are_valid_and_exact(radius: float, dy: float, dx: float) -> None:
    n = math.ceil(radius) + 1
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    disc = (yy - dy) ** 2 + (xx - dx) ** 2 <= radius**2
    if disc.any():
        g = check(disc, 1000, 2000)
        assert g.geom_type == "Polygon" and not g.interiors


def test_every_3x3_mask() -> None:
    for bits in range(1, 2**9):
        check(((bits >> np.arange(9)) & 1).astype(bool).reshape(3, 3))


def test_single_pixel_is_a_unit_square() -> None:
    assert outline(np.ones((1, 1), dtype=bool)) == [[[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]]
    f = feature(1, np.array([[0, 0], [0, 1]], dtype=bool), 0, 0)
    assert f["geometry"] == {"type": "Polygon", "coordinates": [[[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]]]}


def test_full_crop_is_its_rectangle() -> None:
    mask = np.ones((4, 6), dtype=bool)
    assert outline(mask) == [[[[0, 0], [6, 0], [6, 4], [0, 4], [0, 0]]]]
    check(mask)


def test_empty_mask() -> None:
    assert outline(np.zeros((3, 4), dtype=bool)) == []
    assert outline(np.zeros((0, 0), dtype=bool)) == []
    with pytest.raises(ValueError, match="no pixels"):
        feature(1, np.zeros((3, 4), dtype=bool), 0, 0)
    with pytest.raises(ValueError, match="2-D"):
        outline(np.ones(3, dtype=bool))


# -- pinch points and holes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [np.eye(2, dtype=bool), np.eye(2, dtype=bool)[::-1]], ids=["diagonal", "anti"])
def test_two_pixels_touching_at_a_corner_are_two_squares(mask: Mask) -> None:
    g = check(mask)
    assert g.geom_type == "MultiPolygon" and len(g.geoms) == 2
    assert all(p.area == 1 and not p.interiors for p in g.geoms)
    a, b = g.geoms
    assert a.intersection(b).geom_type == "Point"


def test_checkerboard_is_five_squares() -> None:
    mask = (np.indices((3, 3)).sum(axis=0) % 2 == 0).astype(bool)
    g = check(mask)
    assert g.geom_type == "MultiPolygon" and len(g.geoms) == 5
    assert all(p.area == 1 for p in g.geoms)


def test_shape_touching_itself_at_a_corner_gets_a_hole() -> None:
    # a hook whose tip (2, 2) touches (1, 3) diagonally, enclosing pixel (1, 2) but for that corner
    mask = np.array([[0, 1, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]], dtype=bool)
    g = check(mask)
    assert g.geom_type == "Polygon" and len(g.interiors) == 1
    hole = shapely.Polygon(g.interiors[0])
    assert hole.area == 1 and hole.centroid.equals(shapely.Point(2.5, 1.5))
    assert g.exterior.intersection(g.interiors[0]).equals(shapely.Point(3, 2))  # touching at the pinch


def test_ring_of_pixels_has_one_hole() -> None:
    mask = np.ones((5, 5), dtype=bool)
    mask[1:4, 1:4] = False
    (poly,) = outline(mask)
    assert poly == [
        [[0, 0], [5, 0], [5, 5], [0, 5], [0, 0]],
        [[1, 1], [1, 4], [4, 4], [4, 1], [1, 1]],
    ]
    g = check(mask)
    assert g.area == 16 == mask.sum()


def test_island_in_a_hole_is_its_own_polygon() -> None:
    mask = np.ones((7, 9), dtype=bool)
    mask[1:6, 1:8] = False
    mask[3, 2] = mask[3, 6] = True  # two islands in the hole
    mask[1, 1] = True  # a bump on the inner wall: still the ring's pixel
    g = check(mask)
    assert g.geom_type == "MultiPolygon" and len(g.geoms) == 3
    ring = max(g.geoms, key=lambda p: p.area)
    assert len(ring.interiors) == 1


def test_nested_components_get_their_own_holes() -> None:
    # an annulus in the hole of a bigger one, touching it only at a corner: (2, 2) and the bump (1, 1)
    mask = np.zeros((11, 11), dtype=bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    mask[1, 1] = True
    mask[2:9, 2:9] = True
    mask[4:7, 4:7] = False
    g = check(mask)
    assert g.geom_type == "MultiPolygon"
    big, small = sorted(g.geoms, key=lambda p: -p.area)
    assert len(big.interiors) == len(small.interiors) == 1
    assert shapely.Polygon(big.interiors[0]).contains(small)
    assert big.intersection(small).equals(shapely.Point(2, 2))


# -- orientation and offsets ------------------------------------------------------------------------------------


def test_orientation_exterior_ccw_holes_cw_as_written() -> None:
    mask = np.ones((3, 3), dtype=bool)
    mask[1, 1] = False
    ((exterior, hole),) = outline(mask)
    assert signed_area(exterior) == 9 and signed_area(hole) == -1
    assert shapely.LinearRing(exterior).is_ccw and not shapely.LinearRing(hole).is_ccw
    # first step of the exterior is +x from the top-left corner (clockwise on a y-down screen)
    assert exterior[:2] == [[0, 0], [3, 0]]


def test_offsets_shift_the_coordinates() -> None:
    mask = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    f = feature(3, mask, 100, 2000)
    (poly,) = outline(mask)
    assert f["geometry"]["coordinates"] == [[[x + 2000, y + 100] for x, y in ring] for ring in poly]
    assert shape(f["geometry"]).bounds == (2000, 100, 2003, 102)
    check(mask, 100, 2000)


# -- QuPath properties ------------------------------------------------------------------------------------------


def test_feature_properties_are_qupaths() -> None:
    mask = np.ones((2, 3), dtype=bool)
    f = feature(
        42, mask, 0, 0, classification="Tumor", color=(200, 0, 0), measurements={"Area px": 6, "Mean": float("nan")}
    )
    assert "id" not in f  # QuPath reads a top-level id as a UUID
    assert f["type"] == "Feature"
    props = f["properties"]
    assert props["objectType"] == props["object_type"] == "detection"
    assert props["name"] == "42" and props["object_id"] == 42
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert props["measurements"] == [{"name": "Area px", "value": 6.0}, {"name": "Mean", "value": "NaN"}]
    plain = feature(1, mask, 0, 0)["properties"]
    assert plain["classification"]["name"] == "Nucleus" and len(plain["classification"]["color"]) == 3
    assert "measurements" not in plain
    with pytest.raises(ValueError, match="color"):
        feature(1, mask, 0, 0, color=(0, 0, 256))


# -- the writer -------------------------------------------------------------------------------------------------


def features(n: int) -> list[dict[str, Any]]:
    return [feature(i, np.ones((1, i + 1), dtype=bool), i, 2 * i, measurements={"area": i + 1.0}) for i in range(n)]


def test_writer_streams_a_feature_collection(tmp_path: Path) -> None:
    target = tmp_path / "nuclei.geojson"
    writer = GeoJsonWriter(target)
    for f in features(5):
        writer.add(f)
    assert writer.count == 5 and not target.exists()
    writer.finish()
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei.geojson"]
    text = target.read_text()
    data = json.loads(text)
    assert data["type"] == "FeatureCollection"
    assert [f["properties"]["name"] for f in data["features"]] == [str(i) for i in range(5)]
    assert data["features"] == json.loads(json.dumps(features(5)))
    assert " " not in text and ".0" not in text, "compact, integral floats as ints"


def test_writer_compacts_numbers(tmp_path: Path) -> None:
    target = tmp_path / "x.geojson"
    with GeoJsonWriter(target) as writer:
        writer.add({"a": [1.0, 2.5, np.float32(3.0), np.int64(4), np.array([5.0, 6.5])], "b": True, "c": 1e300})
    assert target.read_text().startswith('{"type":"FeatureCollection","features":[{"a":[1,2.5,3,4,[5,6.5]]')
    assert json.loads(target.read_text())["features"][0]["c"] == 1e300


def test_writer_empty_collection(tmp_path: Path) -> None:
    target = tmp_path / "empty.geojson"
    writer = GeoJsonWriter(target)
    writer.finish()
    assert json.loads(target.read_text()) == {"type": "FeatureCollection", "features": []}
    assert writer.count == 0


def test_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "nuclei.geojson"
    writer = GeoJsonWriter(target)
    writer.add(features(1)[0])
    assert len(list(tmp_path.iterdir())) == 1  # the temporary file
    writer.abort()
    writer.abort()  # again: nothing happens
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        writer.add(features(1)[0])
    with pytest.raises(RuntimeError):
        writer.finish()


def test_writer_abort_keeps_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "nuclei.geojson"
    target.write_text("old")
    with pytest.raises(KeyError), GeoJsonWriter(target) as writer:
        writer.add(features(1)[0])
        raise KeyError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei.geojson"]


def test_writer_refuses_nan_and_writes_nothing_of_it(tmp_path: Path) -> None:
    target = tmp_path / "nuclei.geojson"
    writer = GeoJsonWriter(target)
    writer.add({"v": 1})
    with pytest.raises(ValueError):
        writer.add({"v": float("nan")})
    writer.finish()
    writer.abort()  # after finish: a no-op
    assert json.loads(target.read_text())["features"] == [{"v": 1}]
