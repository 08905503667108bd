from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from service.errors import CorruptImageError, ImageTooLargeError, NotATiffError, UnsupportedImageError
from service.io import encode_tiff, read_header, write_tiff
from service.sources import read_image


def bomb_tiff(width: int = 60000, height: int = 60000) -> bytes:
    """A tiny, well-formed TIFF whose header claims ``width x height`` uint8 pixels."""
    entries = [
        (256, 4, 1, width),  # ImageWidth, LONG
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: min-is-black
        (273, 4, 1, 8),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, (width * height) % 2**32),  # StripByteCounts
        (284, 3, 1, 1),  # PlanarConfiguration: contiguous
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += (
            struct.pack("<HHII", tag, typ, count, value)
            if typ == 4
            else struct.pack("<HHIHH", tag, typ, count, value, 0)
        )
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def test_bomb_is_134_bytes_and_refused_from_the_header() -> None:
    data = bomb_tiff()
    assert len(data) == 134  # 8-byte header + an IFD of 10 entries
    with pytest.raises(ImageTooLargeError, match=r"declares 3,600,000,000 pixels .* limit is 100,000,000"):
        read_header(data, max_pixels=100_000_000)
    with pytest.raises(ImageTooLargeError):
        read_image(data, max_pixels=100_000_000)


def test_truncated_data_refused_without_limit() -> None:
    with pytest.raises(CorruptImageError, match="truncated"):
        read_image(bomb_tiff(), max_pixels=None)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_grayscale_dtypes(tmp_path: Path, dtype: type) -> None:
    data = (np.arange(12 * 17) % 200).astype(dtype).reshape(12, 17)
    tifffile.imwrite(tmp_path / "a.tif", data)
    img = read_image(tmp_path / "a.tif")
    assert img.header.axes == "YX" and img.header.channels == 1
    assert img.planes.shape == (1, 1, 12, 17) and img.planes.dtype == dtype
    np.testing.assert_array_equal(img.planes[0, 0], data)


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint32, np.int8])
def test_unsupported_dtype_names_the_supported_ones(tmp_path: Path, dtype: type) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), dtype))
    with pytest.raises(
        UnsupportedImageError, match=r"unsupported pixel type .*; expected one of uint8, uint16, int16, float32"
    ):
        read_header(tmp_path / "a.tif")


def test_rgb_is_yxs_with_three_channels(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (10, 11, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    img = read_image(tmp_path / "rgb.tif")
    assert img.header.axes == "YXS" and img.header.channels == 3
    np.testing.assert_array_equal(img.planes[0], rgb.transpose(2, 0, 1))


def test_cyx_and_stacks(tmp_path: Path) -> None:
    cyx = np.random.default_rng(0).integers(0, 255, (2, 10, 11)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "cyx.tif", cyx, metadata={"axes": "CYX"})
    img = read_image(tmp_path / "cyx.tif")
    assert img.header.axes == "CYX" and img.header.channels == 2 and img.planes.shape == (1, 2, 10, 11)

    tzcyx = np.random.default_rng(1).integers(0, 255, (2, 3, 2, 10, 11)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "h.tif", tzcyx, imagej=True, metadata={"axes": "TZCYX"})
    img = read_image(tmp_path / "h.tif")
    assert img.header.axes == "TZCYX" and img.header.stack_axes == "TZ" and img.header.stack_shape == (2, 3)
    assert img.planes.shape == (6, 2, 10, 11)
    np.testing.assert_array_equal(img.planes[4], tzcyx[1, 1])


def test_not_a_tiff(tmp_path: Path) -> None:
    (tmp_path / "x.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(NotATiffError, match="not a TIFF file"):
        read_header(tmp_path / "x.tif")
    with pytest.raises(NotATiffError):
        read_image(b"")


def test_truncated_file(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.ones((300, 300), np.uint16))
    data = (tmp_path / "a.tif").read_bytes()
    for cut in (len(data) // 2, 20, 9):
        with pytest.raises(CorruptImageError):
            read_image(data[:cut])


def test_output_keeps_stack_axes_resolution_and_is_compressed(tmp_path: Path) -> None:
    stack = np.zeros((3, 64, 80), np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"}, resolution=(2.0, 4.0))
    img = read_image(tmp_path / "z.tif")
    labels = np.ones((3, 64, 80), np.uint8)
    write_tiff(tmp_path / "out.tif", img.header, labels)
    with tifffile.TiffFile(tmp_path / "out.tif") as t:
        assert t.series[0].axes == "ZYX" and t.series[0].shape == (3, 64, 80)
        assert t.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_allclose(t.pages[0].get_resolution(), (2.0, 4.0))
    probs = np.zeros((3, 2, 64, 80), np.float32)
    with tifffile.TiffFile(io.BytesIO(encode_tiff(img.header, probs))) as t:
        assert t.series[0].axes == "ZCYX" and t.series[0].dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tif", "z.tif"]


@pytest.mark.parametrize(
    ("axes", "shape", "stack", "planes"),
    [
        ("QQQYX", (2, 2, 2, 6, 7), "QQQ", 8),  # repeated letters: once "repeated axis in transpose"
        ("ZZCYX", (2, 3, 1, 6, 7), "ZZ", 6),
        ("YXZ", (6, 7, 3), "Z", 3),  # Y and X anywhere
        ("XSY", (7, 1, 6), "", 1),
    ],
)
def test_stack_axes_are_found_by_position(
    tmp_path: Path, axes: str, shape: tuple[int, ...], stack: str, planes: int
) -> None:
    data = np.arange(math.prod(shape), dtype=np.uint16).reshape(shape)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", metadata={"axes": axes})
    img = read_image(tmp_path / "a.tif")
    assert img.header.axes == axes and img.header.stack_axes == stack
    assert img.planes.shape == (planes, 1, 6, 7)
    rest = "".join(a for a in axes if a not in "CS")  # the channel axis has size 1 here
    plain = data.reshape([n for a, n in zip(axes, shape, strict=True) if a not in "CS"])
    order = [i for i, a in enumerate(rest) if a not in "YX"] + [rest.index("Y"), rest.index("X")]
    np.testing.assert_array_equal(img.planes[:, 0], plain.transpose(order).reshape(planes, 6, 7))


@pytest.mark.parametrize(
    ("axes", "shape", "message"),
    [
        ("CYXS", (2, 6, 7, 3), "at most one channel axis"),
        ("CCYX", (2, 2, 6, 7), "at most one channel axis"),
        ("YYX", (2, 6, 7), "exactly one Y and one X"),
        ("QZX", (2, 6, 7), "exactly one Y and one X"),
        ("qYX", (2, 6, 7), "letters A-Z"),
        ("ZYX", (0, 6, 7), "no pixels"),
    ],
)
def test_unreadable_axes_are_refused_naming_them(
    tmp_path: Path, axes: str, shape: tuple[int, ...], message: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about the zero-size one
        tifffile.imwrite(
            tmp_path / "a.tif", np.zeros(shape, np.uint8), photometric="minisblack", metadata={"axes": axes}
        )
    with pytest.raises(UnsupportedImageError, match=rf"{message}.*axes '{axes}' of shape"):
        read_header(tmp_path / "a.tif")


@pytest.mark.parametrize(("axes", "shape"), [("QQQYX", (2, 2, 2, 6, 7)), ("IZYX", (2, 1, 6, 7)), ("XY", (7, 6))])
def test_output_axes_round_trip_stack_axes_then_yx(tmp_path: Path, axes: str, shape: tuple[int, ...]) -> None:
    """What a user reads back: the stack axes in the input's order, then YX (probabilities: C for
    the classes before YX); repeated letters survive tifffile's shaped metadata."""
    tifffile.imwrite(tmp_path / "a.tif", np.zeros(shape, np.uint8), photometric="minisblack", metadata={"axes": axes})
    header = read_image(tmp_path / "a.tif").header
    n = math.prod(header.stack_shape)
    write_tiff(tmp_path / "out.tif", header, np.ones((n, 6, 7), np.uint8))
    stack = "".join(a for a in axes if a not in "YX")
    with tifffile.TiffFile(tmp_path / "out.tif") as t:
        assert t.series[0].axes == stack + "YX" and t.series[0].shape == (*header.stack_shape, 6, 7)
    with tifffile.TiffFile(io.BytesIO(encode_tiff(header, np.zeros((n, 2, 6, 7), np.float32)))) as t:
        assert t.series[0].axes == stack + "CYX" and t.series[0].shape == (*header.stack_shape, 2, 6, 7)


def two_series_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.full((20, 30), 1, np.uint8), np.full((3, 10, 12), 2, np.uint16)
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(first, photometric="minisblack")
        tif.write(second, photometric="minisblack", metadata={"axes": "ZYX"})
    return first, second


def test_series_are_counted_and_chosen(tmp_path: Path) -> None:
    _, second = two_series_file(tmp_path / "two.ome.tif")
    h0 = read_header(tmp_path / "two.ome.tif")
    assert (h0.series, h0.series_count, h0.shape) == (0, 2, (20, 30))
    img = read_image(tmp_path / "two.ome.tif", series=1)
    assert (img.header.series, img.header.series_count, img.header.axes) == (1, 2, "ZYX")
    np.testing.assert_array_equal(img.planes[:, 0], second)
    with pytest.raises(UnsupportedImageError, match=r"series 2 does not exist: the file holds 2 series \(0\.\.1\)"):
        read_header(tmp_path / "two.ome.tif", series=2)
    with pytest.raises(UnsupportedImageError, match="holds 2 series"):
        read_image(tmp_path / "two.ome.tif", series=5)


def test_pyramid_levels_are_not_series(tmp_path: Path) -> None:
    base = np.zeros((64, 64), np.uint8)
    with tifffile.TiffWriter(tmp_path / "p.ome.tif", ome=True) as tif:
        tif.write(base, subifds=1, photometric="minisblack")
        tif.write(base[::2, ::2], subfiletype=1, photometric="minisblack")
    h = read_header(tmp_path / "p.ome.tif")
    assert (h.series_count, h.shape) == (1, (64, 64))
