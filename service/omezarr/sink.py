"""The OME-Zarr sink: uint8 class labels as ``labels/<name>`` of a new store (with a copy of the
image) or of the input's own store, each chunk of every pyramid level written once."""

from __future__ import annotations

import itertools
import logging
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr

from tiling import BandSink, TilePlan, TileSink
from unet.atomic import AtomicTarget

from ..errors import UnsupportedImageError, storage_error
from ..io import ImageHeader
from ..preview import class_colors
from ..sources import NGFF_VERSIONS, Source, plane_count
from ._metadata import _LABEL_NAME, _RANK, _json, _labels_list
from ._pyramid import _factors_of, _Layout, _PlaneWriter
from .blocks import BlockWriter, block_levels, finish_levels
from .source import OmeZarrSource

with warnings.catch_warnings():  # ome_zarr.writer makes a deprecated Scaler() default argument at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import add_metadata, write_label_metadata, write_multiscales_metadata

__all__ = ["OmeZarrSink"]

log = logging.getLogger(__name__)


class OmeZarrSink:
    """uint8 class labels as ``labels/<name>`` of an OME-Zarr image (see :mod:`service.omezarr`).

    ``target``: the new store (a ``.zarr`` directory; written beside it under a temporary
    name and renamed at :meth:`finish`, replacing an existing one then). With ``into`` (the
    input's own store; ``target`` is then None or the same path) the labels are added there:
    refused if ``labels/<name>`` exists; written under a temporary name inside ``labels/``,
    renamed and listed in the labels group at :meth:`finish`; :meth:`abort` (or a failed
    finish) removes them and restores the labels group's metadata files byte for byte. The
    NGFF version, axes, level count and level shapes are then the store's.

    A new store (``version`` ``"0.4"``: Zarr v2, ``"0.5"``: Zarr v3) holds the image, copied
    band by band from ``image`` (same dtype; axes t, c, z, y, x as present: other stack axes
    are refused) with a pyramid whose level k is the mean of (f_k / f_(k-1))² blocks of level
    k-1 (its translation puts each pixel at its block's centre), and ``labels/<name>``.

    Labels: the image's axes without the channel axis, uint8, one level per image level
    (``levels`` / ``level_factors``; default: the OME-Zarr input's, else halving until a level
    fits one chunk); level k is every f_k-th pixel of level 0 (nearest neighbour) with the
    scale times f_k on y/x; ``image-label`` gives each class a color (``background``
    transparent), its name (``class_names``) as the ``class`` property, and ``source``
    ``../../``. Physical scale: ``scale`` per axis name, else the OME-Zarr input's (with its
    units and translation), else the header's µm pixel size and z spacing, else 1.0.

    Chunks: ``chunks`` in y and x, 1 on stack axes, all channels in one; each chunk is written
    once, whole (background-only chunks too), and none is read back.
    """

    def __init__(
        self,
        target: Path | None,
        header: ImageHeader,
        *,
        class_names: Sequence[str],
        version: str | None = None,
        name: str = "unet",
        into: Path | None = None,
        image: Source | None = None,
        levels: int | None = None,
        level_factors: Sequence[int] | None = None,
        scale: Mapping[str, float] | None = None,
        chunks: int = 256,
        background: int = 0,
        instances: bool = False,
    ) -> None:
        if not _LABEL_NAME.fullmatch(name):
            raise UnsupportedImageError(
                f"label name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        if not 1 <= len(class_names) <= 256:
            raise ValueError(f"expected 1 to 256 class names for uint8 labels, got {len(class_names)}")
        if chunks < 1:
            raise ValueError(f"chunks must be positive, got {chunks}")
        if into is None and target is None:
            raise ValueError("a target store or into= is needed")
        if into is not None and target is not None and Path(target).resolve() != Path(into).resolve():
            raise ValueError(f"target {target} and into {into} name different stores")
        if into is None and (image is None or image.header.shape != header.shape):
            raise ValueError("a new OME-Zarr store needs the image to copy (image=, of the header's shape)")
        self.header, self.name, self.image = header, name, image if into is None else None
        self.class_names, self.background, self.chunks = list(class_names), background, chunks
        self.instances = instances  # uint32 object ids (no class colours) instead of uint8 class ids
        self.label_dtype = np.dtype(np.uint32 if instances else np.uint8)
        self.planes = plane_count(header)
        self.done: set[int] = set()
        self.image_arrays: list[Any] = []
        self.label_arrays: list[Any] = []
        self._into = Path(into) if into is not None else None
        self._atomic: AtomicTarget | None = None
        self._labels_dir: Path | None = None  # into a store: its labels group, and what to restore there
        self._saved: dict[str, bytes | None] = {}
        self._made_labels_dir = self._renamed = False
        self._closed = False
        try:
            if self._into is not None:
                self.layout = self._into_layout(self._into, version, levels, level_factors, scale)
                self._open_into(self._into)
            else:
                assert target is not None
                self.layout = self._new_layout(version or "0.4", levels, level_factors, scale)
                self._open_new(Path(target))
        except OSError as e:
            self.abort()
            raise storage_error(e, "creating the OME-Zarr output") from None
        except BaseException:
            self.abort()
            raise

    # --- layout -------------------------------------------------------------------------

    def _new_layout(
        self, version: str, levels: int | None, level_factors: Sequence[int] | None, scale: Mapping[str, float] | None
    ) -> _Layout:
        if version not in NGFF_VERSIONS:
            raise UnsupportedImageError(f"OME-Zarr version {version!r} cannot be written; expected 0.4 or 0.5")
        header = self.header
        if any(a not in "TZ" for a in header.stack_axes) or len(set(header.stack_axes)) != len(header.stack_axes):
            raise UnsupportedImageError(
                f"an OME-Zarr image has axes t, c, z, y, x (each at most once); this one has axes {header.axes!r} "
                f"of shape {header.shape}: write a TIFF instead"
            )
        order = sorted(range(len(header.axes)), key=lambda i: _RANK[header.axes[i]])
        letters = "".join(header.axes[i] for i in order)
        source = self.image if isinstance(self.image, OmeZarrSource) else None
        if source is not None:
            axes = [dict(source.ngff_axes[i]) for i in order]
            base, translation = dict(source.scale), dict(source.translation)
            if levels is None and level_factors is None:
                level_factors = source.level_factors
        else:
            base, translation, units = {}, {}, {}
            if header.pixel_size_um is not None:
                base["y"], base["x"] = header.pixel_size_um
                units["y"] = units["x"] = "micrometer"
            if header.imagej_spacing is not None and "Z" in header.axes:
                base["z"], units["z"] = float(header.imagej_spacing), "micrometer"
            axes = []
            for letter in letters:
                name = "c" if letter in "CS" else letter.lower()
                axis = {"name": name, "type": {"T": "time", "C": "channel", "S": "channel"}.get(letter, "space")}
                axes.append(axis | ({"unit": units[name]} if name in units else {}))
        factors = _factors_of(levels, level_factors, header.height, header.width, self.chunks)
        if any(b % a for a, b in itertools.pairwise(factors)):  # the image's block means need a chain
            log.info("level factors %s do not divide one another: the new store's pyramid halves", factors)
            factors = [2**k for k in range(len(factors))]
        shapes = [(-(-header.height // f), -(-header.width // f)) for f in factors]
        return _Layout(version, axes, letters, order, factors, shapes, dict(scale or base), translation)

    def _into_layout(
        self,
        store: Path,
        version: str | None,
        levels: int | None,
        level_factors: Sequence[int] | None,
        scale: Mapping[str, float] | None,
    ) -> _Layout:
        with OmeZarrSource(store) as source:
            got, have = (self.header.axes, self.header.shape), (source.header.axes, source.header.shape)
            if got != have:
                raise ValueError(f"header {got} is not that of {store.name} {have}")
            if version is not None and version != source.version:
                raise UnsupportedImageError(
                    f"{store.name} is OME-Zarr {source.version}: labels added to it are {source.version}, not {version}"
                )
            if not source.header.axes.endswith("YX"):
                raise UnsupportedImageError(f"labels can be added to images whose last axes are y, x; got {got[0]}")
            factors = _factors_of(levels, level_factors or source.level_factors, 1, 1, 1)
            if len(factors) != source.levels:
                raise ValueError(f"{store.name} has {source.levels} levels; its labels need as many, got {factors}")
            h, w = self.header.height, self.header.width
            shapes = [
                (min(-(-h // f), lh), min(-(-w // f), lw))
                for f, (lh, lw) in zip(factors, source.level_shapes, strict=True)
            ]
            order = list(range(len(source.ngff_axes)))
            scale = dict(scale or source.scale)
            return _Layout(
                source.version, source.ngff_axes, source.header.axes, order, factors, shapes, scale, source.translation
            )

    # --- stores -------------------------------------------------------------------------

    def _create_levels(self, group: Any, labels: bool, dtype: npt.DTypeLike) -> list[Any]:
        layout, header = self.layout, self.header
        axes = layout.axes(labels)
        options: dict[str, Any] = {"config": {"write_empty_chunks": True}, "fill_value": 0}
        if layout.fmt.zarr_format == 2:
            options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}  # NGFF 0.4: nested chunk keys
        else:
            options["dimension_names"] = [a["name"] for a, _, _ in axes]
        arrays = []
        for k, (h, w) in enumerate(layout.shapes):
            shape = [h if letter == "Y" else w if letter == "X" else header.shape[i] for _, letter, i in axes]
            chunks = [
                min(self.chunks, n) if letter in "YX" else n if letter in "CS" else 1
                for n, (_, letter, _) in zip(shape, axes, strict=True)
            ]
            arrays.append(group.create_array(str(k), shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, **options))
        return arrays

    def _write_multiscales(self, group: Any, labels: bool, name: str, method: str) -> None:
        layout = self.layout
        datasets = [
            {"path": str(k), "coordinateTransformations": layout.transforms(labels, f, centre=not labels)}
            for k, f in enumerate(layout.factors)
        ]
        axes = [a for a, _, _ in layout.axes(labels)]
        write_multiscales_metadata(group, datasets, fmt=layout.fmt, axes=axes, name=name, metadata={"method": method})

    def _label_group(self, group: Any) -> None:
        """The label arrays and their multiscales in ``group`` (``image-label`` comes with the listing)."""
        self.label_arrays = self._create_levels(group, True, self.label_dtype)
        self._write_multiscales(group, True, self.name, "nearest neighbour: every f-th pixel of level 0")

    def _image_label(self) -> dict[str, Any]:
        if self.instances:  # one value per object: viewers colour them themselves
            return {"source": {"image": "../../"}}
        colors, properties = [], []
        for k, (class_name, rgb) in enumerate(
            zip(self.class_names, class_colors(len(self.class_names), self.background), strict=True)
        ):
            colors.append({"label-value": k, "rgba": [*rgb, 255] if rgb is not None else [0, 0, 0, 0]})
            properties.append({"label-value": k, "class": class_name})
        return {"colors": colors, "properties": properties, "source": {"image": "../../"}}

    def _open_new(self, target: Path) -> None:
        self._atomic = AtomicTarget(target, directory=True)
        tmp = self._atomic.path
        fmt = self.layout.fmt
        root = zarr.open_group(str(tmp), mode="w", zarr_format=fmt.zarr_format)
        self.image_arrays = self._create_levels(root, False, self.header.dtype)
        self._write_multiscales(root, False, "image", "local mean of (f_k / f_k-1)^2 blocks of level k-1")
        labels = root.create_group("labels")
        if fmt.version == "0.5":
            add_metadata(labels, {"version": fmt.version}, fmt=fmt)
        self._label_group(labels.create_group(self.name))
        write_label_metadata(labels, self.name, fmt=fmt, **self._image_label())

    def _open_into(self, store: Path) -> None:
        zarr_format = self.layout.fmt.zarr_format
        if (store / ".zmetadata").exists() or "consolidated_metadata" in _json(store / "zarr.json"):
            raise UnsupportedImageError(
                f"{store.name} has consolidated metadata, which labels added to it would leave stale; "
                "write the labels to a new store instead"
            )
        labels_dir = store / "labels"
        if (labels_dir / self.name).exists() or self.name in _labels_list(labels_dir, zarr_format):
            raise UnsupportedImageError(f"labels/{self.name} exists in {store.name}; choose another --label-name")
        meta = [".zattrs", ".zgroup"] if zarr_format == 2 else ["zarr.json"]
        self._saved = {n: (labels_dir / n).read_bytes() if (labels_dir / n).is_file() else None for n in meta}
        self._labels_dir, self._made_labels_dir = labels_dir, not labels_dir.exists()
        labels_dir.mkdir(exist_ok=True)
        self._atomic = AtomicTarget(labels_dir / self.name, directory=True)
        tmp = self._atomic.path
        self._label_group(zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format))

    # --- Sink ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Finished or aborted: nothing more may be written."""
        return self._closed

    def plane(self, index: int, plan: TilePlan) -> TileSink:
        if self._closed:
            raise RuntimeError("the OME-Zarr output was already finished or aborted")
        if not 0 <= index < self.planes or index in self.done:
            raise ValueError(f"plane {index} is outside 0..{self.planes - 1} or already written")
        if tuple(plan.image_shape) != (self.header.height, self.header.width):
            raise ValueError(f"plan of {plan.image_shape} for an image of {(self.header.height, self.header.width)}")
        return BandSink(plan, self.label_dtype, self.band_writer(index, self.label_dtype))

    def band_writer(self, index: int, dtype: npt.DTypeLike) -> Callable[[npt.NDArray[Any], int], None]:
        """Where plane ``index``'s whole-width bands go, in order (what :meth:`plane` feeds)."""
        if np.dtype(dtype) != self.label_dtype:
            raise ValueError(f"these labels hold {self.label_dtype}, not {np.dtype(dtype)}")
        if self._closed:
            raise RuntimeError("the OME-Zarr output was already finished or aborted")
        if not 0 <= index < self.planes or index in self.done:
            raise ValueError(f"plane {index} is outside 0..{self.planes - 1} or already written")
        return _PlaneWriter(self, index).on_band

    def block_writer(self, block: tuple[int, int], grid: tuple[int, int]) -> BlockWriter:
        """What tasks write blocks of ``block`` = (rows, cols) pixels on a ``grid`` of blocks
        with (see :mod:`.blocks`); once every block is in, :meth:`finish_blocks`."""
        if self._closed:
            raise RuntimeError("the OME-Zarr output was already finished or aborted")
        levels = block_levels(self, block, grid)
        return BlockWriter(self.header, self.layout, list(self.label_arrays), list(self.image_arrays), levels)

    def finish_blocks(self, writer: BlockWriter) -> None:
        """Every block was written with ``writer``: build the coarser levels, then :meth:`finish`."""
        try:
            finish_levels(self, writer.levels)
        except BaseException:
            self.abort()
            raise
        self.finish()

    def finish(self) -> None:
        try:
            if len(self.done) != self.planes:
                raise RuntimeError(f"{self.planes - len(self.done)} of {self.planes} planes were not written")
            self._commit()
        except OSError as e:
            self.abort()
            raise storage_error(e, "writing the OME-Zarr output") from None
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _commit(self) -> None:
        atomic, self._atomic = self._atomic, None
        assert atomic is not None
        if self._labels_dir is None:
            atomic.commit()  # .<name>.<random>.part -> the target store
            return
        if (self._labels_dir / self.name).exists():
            atomic.discard()
            raise UnsupportedImageError(f"labels/{self.name} appeared meanwhile; choose another --label-name")
        atomic.commit()  # labels/.<name>.<random>.part -> labels/<name>
        self._renamed = True
        fmt = self.layout.fmt
        labels = zarr.open_group(str(self._labels_dir), mode="a", zarr_format=fmt.zarr_format)
        if fmt.version == "0.5":
            add_metadata(labels, {"version": fmt.version}, fmt=fmt)
        write_label_metadata(labels, self.name, fmt=fmt, **self._image_label())

    def abort(self) -> None:
        """Remove what was written: a new store's temporary tree; labels being added into a
        store, with its labels group's metadata files restored. Never raises."""
        if self._closed:
            return
        self._closed = True
        atomic, self._atomic = self._atomic, None
        try:
            if atomic is not None:
                atomic.discard()  # deletes the temporary tree
        except Exception as e:
            log.warning("removing a partial OME-Zarr output: %s", e)
        if self._labels_dir is not None:
            self._restore(self._labels_dir)

    def _restore(self, labels_dir: Path) -> None:
        try:
            if self._renamed:
                shutil.rmtree(labels_dir / self.name, ignore_errors=True)
            for n, data in self._saved.items():
                if data is None:
                    (labels_dir / n).unlink(missing_ok=True)
                else:
                    (labels_dir / n).write_bytes(data)
            if self._made_labels_dir and labels_dir.is_dir() and not any(labels_dir.iterdir()):
                labels_dir.rmdir()
        except OSError as e:
            log.warning("restoring the labels group of %s: %s", self._into, e)
