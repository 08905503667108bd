"""The one pipeline: source -> engine -> sink, decided once from one parsed header.

Every way in (the CLI, ``POST /segment``, the job worker) is a few lines around this module:

- :func:`open_input` opens a path once: a TIFF (:class:`~service.sources.TiffSource`: header,
  segment and compression checks in one parse) or an OME-Zarr image
  (:class:`~service.omezarr.OmeZarrSource`);
- :func:`choose_route` decides, from that header alone, how pixels are read (decoded whole,
  or window by window) and how the result is written (in memory then one TIFF, streamed
  tiled BigTIFF, pyramidal OME-TIFF, OME-Zarr labels);
- :func:`open_sink` makes that sink;
- :func:`segment` runs it: the only place that fits the normalization (once per plane), plans
  the tiles, runs the engine (:func:`tiling.run`) and marks no-data pixels; on any error or
  cancel the sink is aborted, so no partial output is left.

No-data: NaN pixels of a float image get the background class (probability 1 for it), so
one NaN never spoils the mask around it (the normalization makes every tile finite, see
:mod:`unet.normalization`). The NaN mask of each tile is taken from the raw window the
engine already read, so the streamed and in-memory paths do it alike and read nothing twice.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

import tiling
from tiling import Tile, TilePlan, TileSink
from tiling.rescale import RescaleBack, RescaledPlane

from .errors import InputError, OptionError
from .io import ImageData, ImageHeader
from .scale import Diameter, Scale, resolve_scale
from .segmenter import Segmenter
from .sinks import ImageSink, MemorySink, PyramidTiffSink, ShowsInput, Sink, TiledTiffSink
from .sources import NGFF_VERSIONS, ArraySource, Source, TiffSource, is_ome_zarr

__all__ = [
    "DEFAULT_STREAM_ABOVE_MB",
    "OUTPUTS",
    "Options",
    "Output",
    "Progress",
    "Report",
    "Route",
    "choose_route",
    "count_tiles",
    "decoded_bytes",
    "open_input",
    "open_sink",
    "plan_of",
    "resolve",
    "run_plane",
    "segment",
    "segment_file",
    "segment_image",
]

log = logging.getLogger(__name__)

DEFAULT_STREAM_ABOVE_MB = 256  # decoded input size (MiB) above which TIFF inputs are read window by window
Progress = Callable[[int], None]  # called with the number of tiles just finished
Output = Literal["labels", "probabilities", "instances"]
OUTPUTS = ("labels", "probabilities", "instances")


@dataclass(frozen=True)
class Options:
    """What to compute, and how to write it (the same options on every way in)."""

    output: Output = "labels"
    tile_size: int = 388
    stride: int | None = None
    pyramid: bool = False  # TIFF output: a pyramidal OME-TIFF
    series: int = 0  # which image series of a TIFF
    ngff: str = "0.4"  # NGFF version of a new OME-Zarr store
    label_name: str = "unet"  # labels/<name> in an OME-Zarr store
    min_area: int | None = None  # instances: drop smaller objects (px; None: the checkpoint's minimum)
    table: Path | None = None  # instances: a measurement table (.csv, .parquet) beside the image
    geojson: Path | None = None  # instances: QuPath shapes beside the image
    preview: Path | None = None  # a preview pyramid of plane 0 (service.preview) beside the result
    preview_max: int | None = None  # store only its levels no larger than this (None: all, for zooming)
    diameter: Diameter = "auto"  # objects' diameter (px), "auto" (estimated) or "off" (never rescale)
    pixel_size: float | None = None  # µm per px given by the caller: rescale to the model's pixel size
    fill_holes: bool = True  # labels: fill the holes of objects (instances always fill theirs)
    scale: Scale | None = None  # the scale chosen for this image (set by resolve)

    @property
    def engine_output(self) -> Literal["labels", "probabilities"]:
        """What the network's tiles give: class labels for labels and instances."""
        return "probabilities" if self.output == "probabilities" else "labels"


@dataclass(frozen=True)
class Route:
    """How one image is read and written; decided once, by :func:`choose_route`."""

    read: Literal["decoded", "windowed"]
    write: Literal["memory", "tiled-tiff", "pyramid-tiff", "ome-zarr"]

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Route:
        """Back from ``dataclasses.asdict`` (a job record), checked.

        >>> Route.from_json({"read": "windowed", "write": "ome-zarr"})
        Route(read='windowed', write='ome-zarr')
        """
        read, write = data["read"], data["write"]
        if read not in ("decoded", "windowed") or write not in ("memory", "tiled-tiff", "pyramid-tiff", "ome-zarr"):
            raise ValueError(f"not a route: {data!r}")
        return cls(read, write)  # type: ignore[arg-type]

    @property
    def streamed(self) -> bool:
        """Whether memory stays O(tile rows x width): windowed reads and a streamed sink."""
        return self.read == "windowed" and self.write != "memory"


def decoded_bytes(header: ImageHeader) -> int:
    """Bytes the whole image takes once decoded.

    >>> decoded_bytes(ImageHeader((1000, 2000), "YX", np.dtype("uint16"), None, None, None))
    4000000
    """
    return header.pixels * header.dtype.itemsize


def choose_route(
    header: ImageHeader,
    options: Options,
    *,
    stream_above_mb: float = DEFAULT_STREAM_ABOVE_MB,
    zarr_in: bool = False,
    zarr_out: bool = False,
) -> Route:
    """The one decision: decoded or windowed reads, in-memory or streamed writes.

    Labels of a large input (decoded above ``stream_above_mb``), a pyramid, and any OME-Zarr
    input or output stream; probabilities are held in memory (float32 per class), and so
    are refused for an OME-Zarr output (NGFF labels hold class ids).

    >>> h = ImageHeader((1000, 2000), "YX", np.dtype("uint8"), None, None, None)
    >>> choose_route(h, Options(), stream_above_mb=1), choose_route(h, Options(), stream_above_mb=2)
    (Route(read='windowed', write='tiled-tiff'), Route(read='decoded', write='memory'))
    >>> choose_route(h, Options(output="probabilities"), stream_above_mb=0, zarr_in=True)
    Route(read='windowed', write='memory')
    """
    if options.output not in OUTPUTS:
        raise OptionError(f"output must be one of {', '.join(OUTPUTS)}, got {options.output!r}")
    labels = options.output != "probabilities"  # instances stream as labels do
    if (options.table is not None or options.geojson is not None) and options.output != "instances":
        raise OptionError("a table or GeoJSON comes with instances: ask for output instances")
    if options.pyramid and not labels:
        raise OptionError("a pyramid applies to labels output, not probabilities")
    if zarr_out and not labels:
        raise OptionError("OME-Zarr labels hold ids: ask for labels or instances, or write probabilities to a TIFF")
    if zarr_out and options.pyramid:
        raise OptionError("an OME-Zarr output always has a pyramid; the pyramid option is for TIFF outputs")
    if zarr_out and options.ngff not in NGFF_VERSIONS:
        raise OptionError(f"NGFF version must be one of {', '.join(NGFF_VERSIONS)}, got {options.ngff!r}")
    large = decoded_bytes(header) > stream_above_mb * 2**20  # MiB, as every _MB setting
    streamed = labels and (large or options.pyramid or zarr_out or zarr_in)
    read: Literal["decoded", "windowed"] = "windowed" if streamed or zarr_in else "decoded"
    if zarr_out:
        return Route(read, "ome-zarr")
    if not streamed:
        return Route(read, "memory")
    return Route(read, "pyramid-tiff" if options.pyramid else "tiled-tiff")


def open_input(path: str | Path, *, series: int = 0, max_pixels: int | None = None) -> Source:
    """A TIFF or an OME-Zarr image, opened and checked once; close it (or use ``with``)."""
    p = Path(path)
    if is_ome_zarr(p):
        from .omezarr import OmeZarrSource  # noqa: PLC0415  (ome-zarr is an optional extra)

        if series:
            raise InputError("--series applies to TIFF inputs; an OME-Zarr image has one multiscales image")
        return OmeZarrSource(p, max_pixels=max_pixels)
    if p.is_dir():
        raise InputError(f"input is a directory but not an OME-Zarr store: {p}")
    if not p.is_file():
        raise InputError(f"input file not found: {p}")
    return TiffSource(p, max_pixels=max_pixels, series=series)


def open_sink(
    route: Route,
    target: Path | None,
    header: ImageHeader,
    segmenter: Segmenter,
    options: Options,
    *,
    source: Source | None = None,
    into_input: bool = False,
) -> Sink:
    """The sink ``route`` says, writing to ``target`` (None: :class:`MemorySink` kept for encoding).

    For instances: an :class:`~service.instances.InstanceSink` around the sink of the uint32
    image, with the table and GeoJSON of ``options``; its provisional ids are spooled beside
    ``target`` on streamed routes (in memory otherwise)."""
    inner = _image_sink(route, target, header, segmenter, options, source=source, into_input=into_input)
    if options.preview is not None:
        inner = _previewed(inner, header, segmenter, options, source)
    labels = options.output == "labels" and options.fill_holes
    if options.output != "instances" and not labels:
        return inner
    from .instances import HoleFillSink, InstanceSink, instance_rule, scaled_rule  # noqa: PLC0415

    spool = None
    if route.streamed:
        spool = target.parent if target is not None else getattr(source, "path", Path(".")).parent
    try:
        factor = options.scale.factor if options.scale is not None else 1.0
        rule = instance_rule(segmenter.checkpoint, options.min_area)
        rule = scaled_rule(rule, factor, min_area_given=options.min_area is not None)
        if labels:
            return HoleFillSink(inner, header, rule, spool_dir=spool)
        assert source is not None, "instances read the input's rows again for their measurements"
        return InstanceSink(inner, header, rule, source, table=options.table, geojson=options.geojson, spool_dir=spool)
    except BaseException:
        inner.abort()
        raise


def _previewed(
    inner: ImageSink, header: ImageHeader, segmenter: Segmenter, options: Options, source: Source | None
) -> ImageSink:
    from .preview import PreviewSink, preview_writer_for  # noqa: PLC0415

    assert options.preview is not None and source is not None, "a preview shows the input's rows"
    ck = segmenter.checkpoint
    try:
        classes = None if options.output == "instances" else list(ck.class_names)
        writer = preview_writer_for(options.preview, header, classes, segmenter.background, options.preview_max)
    except BaseException:
        inner.abort()
        raise
    return PreviewSink(inner, writer, source)


def _image_sink(
    route: Route,
    target: Path | None,
    header: ImageHeader,
    segmenter: Segmenter,
    options: Options,
    *,
    source: Source | None = None,
    into_input: bool = False,
) -> ImageSink:
    ck = segmenter.checkpoint
    instances = options.output == "instances"
    dtype = np.uint32 if instances else np.uint8
    if route.write == "memory":
        return MemorySink(header, options.output, ck.config.num_classes, target)
    assert target is not None or into_input
    if route.write == "ome-zarr":
        from .omezarr import OmeZarrSink, OmeZarrSource  # noqa: PLC0415  (an optional extra)

        zarr_source = source if isinstance(source, OmeZarrSource) else None
        if into_input and zarr_source is None:
            raise InputError("adding labels into the input needs an OME-Zarr input")
        return OmeZarrSink(
            Path(target) if target is not None else zarr_source.path,  # type: ignore[union-attr]
            header,
            class_names=list(ck.class_names),
            version=zarr_source.version if into_input and zarr_source is not None else options.ngff,
            name=options.label_name,
            into=zarr_source.path if into_input and zarr_source is not None else None,
            image=None if into_input else source,
            levels=zarr_source.levels if zarr_source is not None else None,
            level_factors=zarr_source.level_factors if zarr_source is not None else None,
            scale=zarr_source.scale if zarr_source is not None else None,
            background=segmenter.background,
            instances=instances,
        )
    assert target is not None
    if route.write == "pyramid-tiff":
        return PyramidTiffSink(target, header, dtype)
    return TiledTiffSink(target, header, dtype)


class _NoData:
    """The normalization of one plane, noting each raw window's NaN pixels on the way (the
    engine normalizes batches in tile order, on one thread); :meth:`mark` applies them."""

    def __init__(
        self, normalize: Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]], plan: TilePlan, background: int
    ):
        self.normalize, self.background = normalize, background
        th, tw = plan.tile_out
        m = plan.margin
        self.crop = (slice(None), slice(None), slice(m, m + th), slice(m, m + tw))
        self.masks: deque[npt.NDArray[np.bool_] | None] = deque()

    def __call__(self, raw: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        nan = np.isnan(raw[self.crop]).any(axis=1)
        self.masks.extend(m if m.any() else None for m in nan)
        return self.normalize(raw)

    def mark(self, y: npt.NDArray[Any]) -> None:
        nan = self.masks.popleft()
        if nan is None:
            return
        if y.ndim == 2:  # labels
            y[nan] = self.background
        else:  # probabilities
            y[:, nan] = 0.0
            y[self.background, nan] = 1.0


class _PlaneTiles:
    """A plane's tile sink, with the no-data rule and progress on the way in."""

    def __init__(self, inner: TileSink, nodata: _NoData | None, progress: Progress | None) -> None:
        self.inner, self.nodata, self.progress = inner, nodata, progress

    def add(self, tile: Tile, y: npt.NDArray[Any]) -> None:
        if self.nodata is not None:
            self.nodata.mark(y)
        self.inner.add(tile, y)
        if self.progress is not None:
            self.progress(1)

    def finish(self) -> Any:
        return self.inner.finish()


def run_plane(
    segmenter: Segmenter,
    plane: Any,
    plan: TilePlan,
    affine: Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]],
    sink: TileSink,
    output: tiling.Output = "labels",
    progress: Progress | None = None,
) -> Any:
    """Run ``plan``'s tiles of one (C, Y, X) ``plane`` into ``sink`` with the normalization
    ``affine`` (fitted once for the whole plane) and the no-data rule; returns ``sink.finish()``.

    The one place tiles meet the model: :func:`segment` runs a whole plane's plan through it,
    a cluster task one block's plan (:func:`tiling.blocks.block_plan`), so both treat every
    tile alike."""
    nodata = _NoData(affine, plan, segmenter.background) if np.dtype(plane.dtype).kind == "f" else None
    return tiling.run(
        plane,
        plan,
        segmenter.predictor,
        _PlaneTiles(sink, nodata, progress),
        output=output,
        batch_size=segmenter.batch_size,
        normalize=nodata or affine,
    )


def plan_of(segmenter: Segmenter, header: ImageHeader, options: Options) -> TilePlan:
    """The tile plan of every plane of an image (planes share their Y, X), at the scale it is
    segmented at (``options.scale``)."""
    return _plan(segmenter, header, options)


def _plan(segmenter: Segmenter, header: ImageHeader, options: Options) -> TilePlan:
    shape = options.scale.shape if options.scale is not None else (header.height, header.width)
    return tiling.plan_tiles(shape, depth=segmenter.depth, tile_size=options.tile_size, stride=options.stride)


def resolve(segmenter: Segmenter, source: Source, options: Options) -> Options:
    """``options`` with the scale of ``source``'s image chosen (:func:`service.scale.resolve_scale`:
    may segment a crop of plane 0 to estimate the objects' size); as is if already chosen."""
    if options.scale is not None:
        return options
    header = source.header
    segmenter.check(header)
    plane0 = source.plane(0) if math.prod(header.stack_shape) else None
    scale = resolve_scale(segmenter, header, plane0, options.diameter, options.pixel_size)
    if scale.rescaled:
        log.info("objects ~%s px: segmenting at %s", _fmt(scale.diameter_px), scale.describe())
    return replace(options, scale=scale)


def _fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}"


def count_tiles(segmenter: Segmenter, header: ImageHeader, options: Options) -> int:
    """Tiles the whole image takes (all planes)."""
    return len(_plan(segmenter, header, options)) * math.prod(header.stack_shape)


def segment(
    segmenter: Segmenter, source: Source, sink: Sink, options: Options = Options(), progress: Progress | None = None
) -> None:
    """Segment every plane of ``source`` into ``sink``; the sink is committed, or aborted on any error.

    ``progress(n)`` is called with the number of tiles just finished; raising from it stops
    the run at the next tile (the sink is aborted: no output left).
    """
    header = source.header
    try:
        options = resolve(segmenter, source, options)
        scale = options.scale
        assert scale is not None
        plan = _plan(segmenter, header, options)
        for i in range(math.prod(header.stack_shape)):
            plane = source.plane(i)
            affine = segmenter.checkpoint.normalization.fit(plane)  # once per plane, from a bounded sample
            if isinstance(sink, ShowsInput):
                sink.normalized(i, affine)
            if not scale.rescaled:
                run_plane(segmenter, plane, plan, affine, sink.plane(i, plan), options.engine_output, progress)
                continue
            back = RescaleBack(plan, (header.height, header.width), options.engine_output)
            back.connect(sink.plane(i, back.plan))
            run_plane(segmenter, RescaledPlane(plane, scale.shape), plan, affine, back, "probabilities", progress)
        sink.finish()
    except BaseException:
        sink.abort()
        raise


def segment_image(
    segmenter: Segmenter, image: ImageData, options: Options = Options(), progress: Progress | None = None
) -> npt.NDArray[Any]:
    """A decoded image's (planes, Y, X) uint8 labels, uint32 instances (with ``options``'
    table and GeoJSON written) or (planes, K, Y, X) float32 probabilities."""
    source = ArraySource.of(image)
    options = resolve(segmenter, source, options)
    memory = MemorySink(image.header, options.output, segmenter.checkpoint.config.num_classes)
    sink: Sink = memory
    if options.output == "instances" or (options.output == "labels" and options.fill_holes):
        sink = open_sink(Route("decoded", "memory"), None, image.header, segmenter, options, source=source)
        memory = sink.inner  # type: ignore[attr-defined]
    segment(segmenter, source, sink, options, progress)
    return memory.result


@dataclass(frozen=True)
class Report:
    """What :func:`segment_file` did."""

    header: ImageHeader
    route: Route
    tiles: int
    objects: int | None = None  # instances: how many (all planes)
    scale: Scale | None = None  # the scale it was segmented at


def segment_file(
    segmenter: Segmenter,
    src: str | Path,
    dst: str | Path | None,
    options: Options = Options(),
    *,
    stream_above_mb: float = DEFAULT_STREAM_ABOVE_MB,
    max_pixels: int | None = None,
    into_input: bool = False,
    route: Route | None = None,
    progress: Progress | None = None,
    on_open: Callable[[ImageHeader, Route, int], None] | None = None,
    on_scale: Callable[[Scale], None] | None = None,
) -> Report:
    """Segment the image at ``src`` into ``dst`` (TIFF, ``.ome.tif`` with ``options.pyramid``,
    or ``.zarr``/``.ome.zarr``), or with ``into_input`` into the input OME-Zarr's own store.

    ``route``: the decision made earlier (a job's admission), else made here. ``on_open``
    is called with the header, the route and the tile count before any tile is computed;
    ``on_scale`` with the scale chosen (:mod:`service.scale`), before that.
    """
    if into_input and dst is not None:
        raise InputError("give either an output path or into-input, not both")
    if not into_input and dst is None:
        raise InputError("an output path is needed")
    target = Path(dst) if dst is not None else None
    if target is not None:
        if target.resolve() == Path(src).resolve():
            raise InputError("output path must differ from the input path")
        if not target.parent.is_dir():
            raise InputError(f"output directory does not exist: {target.parent}")
    for side in (options.table, options.geojson, options.preview):
        if side is None:
            continue
        if not Path(side).parent.is_dir():
            raise InputError(f"output directory does not exist: {Path(side).parent}")
        if Path(side).resolve() in {Path(src).resolve(), *([target.resolve()] if target is not None else [])}:
            what = "preview" if side == options.preview else "table and GeoJSON"
            raise InputError(f"{side} is the input or the image output: give the {what} their own paths")
    if options.table is not None and options.table == options.geojson:
        raise InputError("the table and the GeoJSON need different paths")
    zarr_out = into_input or (target is not None and is_ome_zarr(target))
    with contextlib.closing(open_input(src, series=options.series, max_pixels=max_pixels)) as source:
        header = source.header
        zarr_in = not isinstance(source, TiffSource)
        if into_input and not zarr_in:
            raise InputError("adding labels into the input needs an OME-Zarr input")
        chosen = route or choose_route(
            header, options, stream_above_mb=stream_above_mb, zarr_in=zarr_in, zarr_out=zarr_out
        )
        segmenter.check(header)
        if isinstance(source, TiffSource):
            source.windowed() if chosen.read == "windowed" else source.decoded()
        options = resolve(segmenter, source, options)
        if on_scale is not None and options.scale is not None:
            on_scale(options.scale)
        tiles = count_tiles(segmenter, header, options)
        if on_open is not None:
            on_open(header, chosen, tiles)
        sink = open_sink(chosen, target, header, segmenter, options, source=source, into_input=into_input)
        segment(segmenter, source, sink, options, progress)
        objects = getattr(sink, "count", None) if options.output == "instances" else None
        return Report(header, chosen, tiles, objects, options.scale)
