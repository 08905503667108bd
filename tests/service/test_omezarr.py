"""OME-Zarr in and out: :class:`service.omezarr.OmeZarrSource` reads what ome-zarr-py writes, and
what :class:`service.omezarr.OmeZarrSink` writes reads back with ome-zarr-py's own ``Reader``."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zarr
import zarr.storage
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Node, Reader

import tiling
import unet
from service.errors import CorruptImageError, ImageTooLargeError, InputError, UnsupportedImageError
from service.io import ImageHeader
from service.omezarr import OmeZarrSink, OmeZarrSource
from service.paths import default_checkpoint
from service.segmenter import Segmenter
from service.sources import ArraySource, is_ome_zarr

with warnings.catch_warnings():  # ome_zarr.writer makes a deprecated Scaler() default argument at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import write_image, write_labels

CLASSES = ("background", "nucleus", "boundary")
RNG = np.random.default_rng(7)


def write_ngff(
    path: Path,
    data: npt.NDArray[Any],
    axes: str,
    version: str,
    *,
    scale: dict[str, float] | None = None,
    unit: str | None = "micrometer",
    factors: Sequence[int] = (2,),
    chunks: int = 64,
) -> Path:
    """A fixture OME-Zarr image written by ome-zarr-py (``factors``: its pyramid levels past 0)."""
    fmt = FormatV04() if version == "0.4" else FormatV05()
    units = {a: unit for a in axes if a in "zyx"} if unit else None
    scale = {a: (scale or {}).get(a, 1.0) for a in axes}
    chunk_shape = tuple(min(chunks, n) if a in "yx" else 1 for a, n in zip(axes, data.shape, strict=True))
    write_image(
        data,
        str(path),
        fmt=fmt,
        axes=list(axes),
        scale=scale,
        axes_units=units,
        scale_factors=list(factors),
        storage_options={"chunks": chunk_shape},
    )
    return path


def label_image(h: int, w: int) -> npt.NDArray[np.uint8]:
    """Class ids 0..2 in blobs (so chunks of background only occur too)."""
    y, x = np.mgrid[:h, :w]
    labels: npt.NDArray[np.uint8] = ((y // 23 + x // 31) % 3).astype(np.uint8)
    labels[: h // 4, : w // 4] = 0
    return labels


def feed(sink: OmeZarrSink, index: int, labels: npt.NDArray[np.uint8], tile: int = 100) -> None:
    """Hand ``labels`` to ``sink.plane(index)`` tile by tile, as the engine would."""
    plan = tiling.plan_tiles(labels.shape, tile_size=tile)
    tiles = sink.plane(index, plan)
    for t in plan.tiles:
        out = np.full(plan.tile_out, 255, np.uint8)  # what keep leaves out must not reach the store
        out[t.keep] = labels[t.dest]
        tiles.add(t, out)
    tiles.finish()


def nodes(path: Path) -> list[Node]:
    location = parse_url(path)
    assert location is not None
    return list(Reader(location)())


def listing(path: Path) -> dict[str, str]:
    """Every file (with its content's hash) and directory under ``path``."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "/"
        for p in path.rglob("*")
    }


def refusal(kind: type[Exception], make: Callable[[], object]) -> str:
    """The message of the ``kind`` error ``make()`` raises: one line, no traceback."""
    with pytest.raises(kind) as e:
        make()
    message = str(e.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def store_counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Counter[str], Counter[str]]]:
    """Every ``set`` and ``get`` of a local zarr store, by key."""
    sets: Counter[str] = Counter()
    gets: Counter[str] = Counter()
    set_, get_ = zarr.storage.LocalStore.set, zarr.storage.LocalStore.get

    async def counting_set(self: zarr.storage.LocalStore, key: str, value: Any) -> None:
        sets[key] += 1
        await set_(self, key, value)

    async def counting_get(self: zarr.storage.LocalStore, key: str, *args: Any, **kwargs: Any) -> Any:
        gets[key] += 1
        return await get_(self, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", counting_set)
    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    yield sets, gets


def is_chunk(key: str) -> bool:
    return Path(key).name not in (".zarray", ".zattrs", ".zgroup", "zarr.json")


# --- the source ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize(
    ("axes", "shape", "dtype"),
    [("yx", (150, 220), np.uint16), ("zyx", (3, 90, 130), np.uint8), ("cyx", (2, 100, 120), np.float32)],
)
def test_source_reads_ome_zarr_windows_axes_and_scale(
    tmp_path: Path, version: str, axes: str, shape: tuple[int, ...], dtype: type
) -> None:
    data: npt.NDArray[Any] = (RNG.random(shape) * 1000).astype(dtype)
    scale = {"z": 2.0, "y": 0.5, "x": 0.25}
    path = write_ngff(tmp_path / "img.zarr", data, axes, version, scale={a: scale[a] for a in axes if a in scale})
    assert is_ome_zarr(path)
    with OmeZarrSource(path) as src:
        h = src.header
        assert (h.axes, h.shape, h.dtype) == (axes.upper(), shape, np.dtype(dtype))
        assert (src.version, src.levels, src.level_factors, src.path) == (version, 2, [1, 2], path)
        assert src.chunks_yx == (64, 64)
        assert src.units == {a: "micrometer" for a in axes if a != "c"}
        assert src.scale == {a: scale.get(a, 1.0) for a in axes}
        assert h.resolution == (1e4 / 0.25, 1e4 / 0.5) and h.resolution_unit == 3  # pixels per cm: (x, y)
        assert h.pixel_size_um == pytest.approx((0.5, 0.25))
        assert h.imagej_spacing == (2.0 if "z" in axes else None)
        planes = data.reshape(-1, *data.shape[-2:]) if axes != "cyx" else data[np.newaxis]
        for i, raw in enumerate(planes):
            plane = src.plane(i)
            expected = raw if axes == "cyx" else raw[np.newaxis]
            assert plane.shape == expected.shape
            np.testing.assert_array_equal(plane[:, 17:81, 40:111], expected[:, 17:81, 40:111])
            np.testing.assert_array_equal(plane[:, ::7, ::5], expected[:, ::7, ::5])


def test_source_combines_level_and_global_transformations_and_unit(tmp_path: Path) -> None:
    path = write_ngff(tmp_path / "img.zarr", np.zeros((40, 60), np.uint8), "yx", "0.4", unit="nanometer")
    attrs = json.loads((path / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    ms["datasets"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [250.0, 500.0]},
        {"type": "translation", "translation": [10.0, 20.0]},
    ]
    ms["coordinateTransformations"] = [{"type": "scale", "scale": [2.0, 2.0]}]
    (path / ".zattrs").write_text(json.dumps(attrs))
    with OmeZarrSource(path) as src:
        assert src.scale == {"y": 500.0, "x": 1000.0}
        assert src.translation == {"y": 20.0, "x": 40.0}
        assert src.header.pixel_size_um == pytest.approx((0.5, 1.0))


def test_source_ignores_a_broken_label_image(tmp_path: Path) -> None:
    """The image's own metadata is all it reads: a label group listed but broken does not matter."""
    path = write_ngff(tmp_path / "img.zarr", np.ones((40, 60), np.uint8), "yx", "0.4")
    labels = zarr.open_group(str(path / "labels"), mode="w", zarr_format=2)
    labels.attrs["labels"] = ["broken"]
    labels.create_group("broken").attrs.update({"image-label": {}, "multiscales": [{"datasets": [{}]}]})
    with pytest.raises(KeyError):  # what ome-zarr-py's Reader makes of it
        nodes(path)
    with OmeZarrSource(path) as src:
        assert src.header.shape == (40, 60)


def test_source_refuses_what_it_cannot_read_in_one_clear_line(tmp_path: Path) -> None:
    good = write_ngff(tmp_path / "good.zarr", np.zeros((2, 30, 40), np.uint8), "zyx", "0.5")

    assert "does not exist" in refusal(CorruptImageError, lambda: OmeZarrSource(tmp_path / "missing.zarr"))

    (tmp_path / "empty.zarr").mkdir()
    assert "no zarr group" in refusal(CorruptImageError, lambda: OmeZarrSource(tmp_path / "empty.zarr"))

    garbled = tmp_path / "garbled.zarr"
    garbled.mkdir()
    (garbled / "zarr.json").write_text("{not json")
    refusal(CorruptImageError, lambda: OmeZarrSource(garbled))

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    zarr.create_array(str(tmp_path / "bare.zarr"), shape=(4, 4), dtype="uint8", zarr_format=3)
    refusal(InputError, lambda: OmeZarrSource(tmp_path / "bare.zarr"))
    assert "not an OME-Zarr image" in refusal(UnsupportedImageError, lambda: OmeZarrSource(tmp_path / "plain.zarr"))

    for n in (good / "s1" / "zarr.json", good / "s0" / "zarr.json"):  # a level array gone
        n.unlink()
    assert "'s0'" in refusal(CorruptImageError, lambda: OmeZarrSource(good))

    big = write_ngff(tmp_path / "big.zarr", np.zeros((30, 40), np.uint8), "yx", "0.4", factors=())
    refusal(ImageTooLargeError, lambda: OmeZarrSource(big, max_pixels=1000))

    wide = write_ngff(tmp_path / "int32.zarr", np.zeros((30, 40), np.int32), "yx", "0.4", factors=())
    assert "int32" in refusal(UnsupportedImageError, lambda: OmeZarrSource(wide))

    attrs = json.loads((big / ".zattrs").read_text())
    attrs["multiscales"][0]["axes"] = [{"name": "y", "type": "space"}, {"name": "q", "type": "space"}]
    (big / ".zattrs").write_text(json.dumps(attrs))
    assert "'q'" in refusal(UnsupportedImageError, lambda: OmeZarrSource(big))

    attrs["multiscales"][0]["version"] = "0.3"
    (big / ".zattrs").write_text(json.dumps(attrs))
    assert "0.3" in refusal(UnsupportedImageError, lambda: OmeZarrSource(big))


# --- the sink -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes", ["yx", "zyx", "cyx"])
def test_new_store_reads_back_with_ome_zarr_py(tmp_path: Path, version: str, axes: str) -> None:
    h, w = 150, 230
    shape = {"yx": (h, w), "zyx": (2, h, w), "cyx": (2, h, w)}[axes]
    image = RNG.integers(0, 4000, shape).astype(np.uint16)
    src_path = write_ngff(tmp_path / "in.zarr", image, axes, version, scale={"y": 0.5, "x": 0.5}, factors=(2, 4))
    masks = [label_image(h, w), label_image(h, w)[::-1].copy()][: 2 if axes == "zyx" else 1]
    out = tmp_path / "out.zarr"
    with OmeZarrSource(src_path) as src:
        sink = OmeZarrSink(
            out, src.header, class_names=CLASSES, version=version, image=src, levels=src.levels, chunks=64
        )
        for i, mask in enumerate(masks):
            feed(sink, i, mask)
        sink.finish()

    found = nodes(out)
    image_node = next(n for n in found if n.first(Label) is None)
    label_node = next(n for n in found if n.first(Label) is not None)
    label_axes = [a for a in axes if a != "c"]
    assert [a["name"] for a in label_node.metadata["axes"]] == label_axes
    assert [a["name"] for a in image_node.metadata["axes"]] == list(axes)
    assert label_node.zarr.basename() == "unet"
    assert len(label_node.data) == len(image_node.data) == 3
    expected = np.stack(masks) if axes == "zyx" else masks[0]
    for k, f in enumerate((1, 2, 4)):
        level = np.asarray(label_node.data[k])
        assert level.dtype == np.uint8
        np.testing.assert_array_equal(level, expected[..., ::f, ::f])
        scale = label_node.metadata["coordinateTransformations"][k][0]["scale"]
        assert scale == [*([1.0] * (len(label_axes) - 2)), 0.5 * f, 0.5 * f]
    assert label_node.metadata["color"][0] == [0, 0, 0, 0]  # background transparent (rgba / 255)
    assert {k: p["class"] for k, p in label_node.metadata["properties"].items()} == dict(enumerate(CLASSES))

    np.testing.assert_array_equal(np.asarray(image_node.data[0]), image)
    block = image[..., :2, :2].astype(np.float64).mean(axis=(-2, -1))
    np.testing.assert_array_equal(np.asarray(image_node.data[1])[..., 0, 0], np.rint(block).astype(np.uint16))
    assert np.asarray(image_node.data[2]).shape[-2:] == (-(-h // 4), -(-w // 4))
    assert image_node.metadata["coordinateTransformations"][1][1]["translation"][-2:] == [0.25, 0.25]

    meta = json.loads((out / "labels" / "unet" / ("zarr.json" if version == "0.5" else ".zattrs")).read_text())
    image_label = (meta["attributes"]["ome"] if version == "0.5" else meta)["image-label"]
    assert image_label["source"] == {"image": "../../"}
    assert [c["label-value"] for c in image_label["colors"]] == [0, 1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_each_output_chunk_is_written_once_and_none_read(
    tmp_path: Path, store_counts: tuple[Counter[str], Counter[str]]
) -> None:
    sets, gets = store_counts
    h, w = 200, 300
    image = RNG.integers(0, 255, (2, h, w)).astype(np.uint8)
    out = tmp_path / "out.zarr"
    header = ImageHeader((2, h, w), "ZYX", np.dtype(np.uint8), None, None, None)
    sink = OmeZarrSink(out, header, class_names=CLASSES, version="0.5", image=ArraySource(image, "ZYX"), chunks=64)
    assert sink.layout.factors == [1, 2, 4, 8]  # halved until a level fits one 64-px chunk (300 / 8 < 64)
    for i in range(2):
        feed(sink, i, label_image(h, w), tile=52)  # bands of 52 rows: never a whole chunk row at once
    sink.finish()

    chunk_sets = {k: n for k, n in sets.items() if is_chunk(k)}
    assert chunk_sets and set(chunk_sets.values()) == {1}
    assert not [k for k in gets if is_chunk(k)]
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and is_chunk(p.name)}
    assert on_disk == set(chunk_sets)
    for group in ("", "labels/unet/"):
        for k, f in enumerate((1, 2, 4, 8)):
            rows, cols = math.ceil(math.ceil(h / f) / 64), math.ceil(math.ceil(w / f) / 64)
            assert sum(1 for key in chunk_sets if key.startswith(f"{group}{k}/c/")) == 2 * rows * cols


def test_tiff_header_gives_micrometre_scale_and_refuses_other_stack_axes(tmp_path: Path) -> None:
    h, w = 70, 90
    header = ImageHeader((h, w), "YX", np.dtype(np.uint8), (20000.0, 10000.0), 3, None)  # 0.5 x 1.0 µm
    image = ArraySource(np.zeros((h, w), np.uint8), "YX", header=header)
    sink = OmeZarrSink(tmp_path / "o.zarr", header, class_names=CLASSES, image=image, levels=2, chunks=32)
    feed(sink, 0, label_image(h, w))
    sink.finish()
    label = next(n for n in nodes(tmp_path / "o.zarr") if n.first(Label) is not None)
    assert [a.get("unit") for a in label.metadata["axes"]] == ["micrometer", "micrometer"]
    assert label.metadata["coordinateTransformations"][1][0]["scale"] == [2.0, 1.0]

    q = ImageHeader((2, h, w), "QYX", np.dtype(np.uint8), None, None, None)
    assert "'QYX'" in refusal(
        UnsupportedImageError,
        lambda: OmeZarrSink(tmp_path / "q.zarr", q, class_names=CLASSES, image=ArraySource(np.zeros((2, h, w)), "QYX")),
    )
    refusal(
        UnsupportedImageError,
        lambda: OmeZarrSink(tmp_path / "v.zarr", header, class_names=CLASSES, image=image, version="0.3"),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]


def test_abort_leaves_no_new_store(tmp_path: Path) -> None:
    h, w = 60, 80
    header = ImageHeader((2, h, w), "ZYX", np.dtype(np.uint8), None, None, None)
    sink = OmeZarrSink(
        tmp_path / "o.zarr", header, class_names=CLASSES, image=ArraySource(np.zeros((2, h, w)), "ZYX"), chunks=32
    )
    feed(sink, 0, label_image(h, w))
    with pytest.raises(RuntimeError, match="1 of 2 planes"):
        sink.finish()  # a plane missing: aborted, never committed
    sink.abort()  # and again: harmless
    with pytest.raises(RuntimeError, match="aborted"):
        feed(sink, 1, label_image(h, w))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_labels_into_the_input_store(tmp_path: Path, version: str) -> None:
    h, w = 120, 170
    path = write_ngff(tmp_path / "in.zarr", np.zeros((h, w), np.uint8), "yx", version, scale={"y": 2, "x": 2})
    existing = np.zeros((h, w), np.uint8)
    fmt = FormatV04() if version == "0.4" else FormatV05()
    write_labels(existing, str(path), name="cells", fmt=fmt, axes="yx", scaler=None, scale_factors=[2])
    with OmeZarrSource(path) as src:
        header, levels = src.header, src.levels
    before = listing(path)

    sink = OmeZarrSink(path, header, class_names=CLASSES, into=path, version=version, chunks=48)
    feed(sink, 0, label_image(h, w))
    sink.abort()
    assert listing(path) == before  # files, bytes and the labels list as they were

    assert "choose another --label-name" in refusal(
        UnsupportedImageError, lambda: OmeZarrSink(None, header, class_names=CLASSES, into=path, name="cells")
    )
    assert listing(path) == before

    sink = OmeZarrSink(None, header, class_names=CLASSES, into=path, name="unet", chunks=48)
    feed(sink, 0, label_image(h, w))
    sink.finish()
    found = {n.zarr.basename(): n for n in nodes(path) if n.first(Label) is not None}
    assert sorted(found) == ["cells", "unet"]
    unet_node = found["unet"]
    assert len(unet_node.data) == levels == 2
    assert [d.shape for d in unet_node.data] == [d.shape for d in found["cells"].data]
    np.testing.assert_array_equal(np.asarray(unet_node.data[1]), label_image(h, w)[::2, ::2])
    assert unet_node.metadata["coordinateTransformations"][1][0]["scale"] == [4.0, 4.0]
    root = next(n for n in nodes(path) if n.first(Multiscales) is not None and n.first(Label) is None)
    assert root.zarr.basename() == "in.zarr"


def test_labels_into_a_store_without_labels_group_and_abort_removes_it(tmp_path: Path) -> None:
    h, w = 50, 70
    path = write_ngff(tmp_path / "in.zarr", np.zeros((2, h, w), np.uint8), "zyx", "0.4", factors=())
    header = OmeZarrSource(path).header
    before = listing(path)
    sink = OmeZarrSink(path, header, class_names=CLASSES, into=path)
    assert (path / "labels").is_dir()
    sink.abort()
    assert listing(path) == before and not (path / "labels").exists()

    sink = OmeZarrSink(path, header, class_names=CLASSES, into=path)
    for i in range(2):
        feed(sink, i, label_image(h, w))
    sink.finish()
    assert json.loads((path / "labels" / ".zattrs").read_text())["labels"] == ["unet"]
    with pytest.raises(UnsupportedImageError, match="labels/unet exists"):
        OmeZarrSink(path, header, class_names=CLASSES, into=path)


def test_segmenting_an_ome_zarr_equals_segmenting_its_array(tmp_path: Path) -> None:
    """The demo model through OmeZarrSource -> engine -> OmeZarrSink gives the in-memory result."""
    segmenter = Segmenter(unet.load_checkpoint(default_checkpoint()), device="cpu", precision="fp32")
    y, x = np.mgrid[:300, :400]
    image = (1000 + 800 * np.sin(y / 9.0) * np.cos(x / 13.0) + RNG.normal(0, 40, (300, 400))).astype(np.uint16)
    path = write_ngff(tmp_path / "in.zarr", image, "yx", "0.4", factors=(2,))
    out = tmp_path / "out.zarr"
    with OmeZarrSource(path) as src:
        plan = tiling.plan_tiles((300, 400), depth=segmenter.depth)
        sink = OmeZarrSink(out, src.header, class_names=CLASSES, image=src, levels=src.levels)
        try:
            plane: Any = src.plane(0)  # a PlaneView: the array-like the engine and the normalization read
            affine = segmenter.checkpoint.normalization.fit(plane)
            tiling.run(plane, plan, segmenter.predictor, sink.plane(0, plan), normalize=affine)
            sink.finish()
        except InputError:
            sink.abort()
            raise
    reference = tiling.run(
        image[np.newaxis],
        plan,
        segmenter.predictor,
        tiling.ArraySink(plan.image_shape, np.uint8),
        normalize=segmenter.checkpoint.normalization.fit(image[np.newaxis]),
    )
    label = next(n for n in nodes(out) if n.first(Label) is not None)
    np.testing.assert_array_equal(np.asarray(label.data[0]), reference)
    assert len(np.unique(reference)) > 1
