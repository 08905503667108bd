"""``unet-tile segment``: an image in (TIFF or OME-Zarr), its mask (or probabilities) out;
or many (``IMG...`` or ``--dir DIR``) into ``--outdir`` with the model loaded once.

The output format follows its name: ``.zarr``/``.ome.zarr`` is an OME-Zarr store (the image
and ``labels/<name>``), anything else a TIFF (``--pyramid``: a pyramidal OME-TIFF);
``--into-input`` adds the labels to the input OME-Zarr's own store instead. Every output is
written atomically. The route (decoded or windowed reads, in-memory or streamed writes) is
:func:`service.pipeline.choose_route`'s, from one parse of the input.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tiling import TilingError
from unet import UNetError
from unet.atomic import atomic_path

from ..errors import ClusterError, InputError, OptionError, StorageError, storage_error
from ..io import ImageHeader
from ..paths import default_checkpoint
from ..pipeline import DEFAULT_STREAM_ABOVE_MB, Options, Route, decoded_bytes, segment_file
from ..preview import Preview
from ..scale import Diameter, parse_diameter
from ..segmenter import Segmenter
from ..sources import NGFF_VERSIONS, is_ome_zarr
from .common import add_model_options, load_segmenter, positive_int

__all__ = ["register"]

log = logging.getLogger(__name__)


def _series_index(text: str) -> int:
    """An argparse type: an image series index >= 0.

    >>> _series_index("0")
    0
    >>> _series_index("-1")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a series index >= 0, got -1
    """
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a series index >= 0, got {text}")
    return value


def _label_name(text: str) -> str:
    """An argparse type: a labels group name (one path segment).

    >>> _label_name("nuclei")
    'nuclei'
    >>> _label_name("../x")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a name of letters, digits, '.', '_' or '-', got '../x'
    """
    if not text or text in (".", "..") or not all(c.isalnum() or c in "._-" for c in text):
        raise argparse.ArgumentTypeError(f"expected a name of letters, digits, '.', '_' or '-', got {text!r}")
    return text


KINDS = ("labels", "probabilities", "instances")
_NAMES = {
    "labels": "{stem}_masks.tif",
    "probabilities": "{stem}_probabilities.tif",
    "instances": "{stem}_instances.tif",
}
_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr")


class _OutputAction(argparse.Action):
    """``-o/--output PATH``; ``--output labels|probabilities|instances``, the kind's old spelling,
    still sets the kind (``--kind`` is its name now), so commands written before keep working."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if option_string == "--output" and values in KINDS:
            namespace.kind = values
        else:
            namespace.output = Path(values)


@dataclass(frozen=True)
class _Item:
    """One input and where its outputs go."""

    src: Path
    dst: Path | None
    table: Path | None = None
    geojson: Path | None = None
    preview: Path | None = None


def _stem(path: Path) -> str:
    """The name without its image suffix.

    >>> _stem(Path("a/slide.ome.tif")), _stem(Path("b.TIFF")), _stem(Path("c.ome.zarr")), _stem(Path("d.png"))
    ('slide', 'b', 'c', 'd')
    """
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _named(pattern: str, src: Path, kind: str, what: str) -> str:
    if "/" in pattern or "\\" in pattern:
        raise InputError(f"{what} is a file name pattern, without a directory: got {pattern!r}")
    try:
        name = pattern.format(stem=_stem(src), name=src.name, kind=kind)
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(f"{what} {pattern!r}: the placeholders are {{stem}}, {{name}} and {{kind}} ({e})") from None
    if not name or name in (".", ".."):
        raise InputError(f"{what} {pattern!r} gives an empty name for {src.name}")
    return name


def _inputs(args: argparse.Namespace) -> list[Path]:
    if args.dir is None:
        return list(args.input)
    if not args.dir.is_dir():
        raise InputError(f"--dir is not a directory: {args.dir}")
    if args.glob is not None:
        found = [p for p in args.dir.glob(args.glob) if p.is_file() or is_ome_zarr(p)]
    else:  # TIFFs and OME-Zarr images
        found = [
            p
            for p in args.dir.iterdir()
            if (p.is_file() and p.suffix.lower() in (".tif", ".tiff"))
            or (p.suffix.lower() == ".zarr" and is_ome_zarr(p))
        ]
    if not found:
        raise InputError(f"no images in {args.dir} matching {args.glob or '*.tif, *.tiff, *.zarr'}")
    return [*args.input, *sorted(found)]


def _items(args: argparse.Namespace, inputs: list[Path]) -> list[_Item]:
    """Where each input's outputs go: ``-o`` and the side paths for one input, else ``--outdir``
    and the name patterns (``--name``, and ``--table``/``--geojson``/``--preview`` as patterns)."""
    if not args.batch:
        return [_Item(inputs[0], args.output, args.table, args.geojson, args.preview)]
    if args.into_input:
        return [_Item(src, None) for src in inputs]  # each OME-Zarr input gets its labels
    outdir: Path = args.outdir
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"--outdir is not a directory: {outdir}")
    pattern = args.name or _NAMES[args.kind]
    items: list[_Item] = []
    seen: dict[Path, Path] = {}
    for src in inputs:
        sides = {}
        for what, value in (("--table", args.table), ("--geojson", args.geojson), ("--preview", args.preview)):
            if value is None:
                continue
            text = str(value)
            if "{" not in text:
                raise InputError(
                    f"with several inputs {what} is a name pattern, such as '{{stem}}_{what[2:]}...': got {text!r}"
                )
            sides[what] = outdir / _named(text, src, args.kind, what)
        dst = outdir / _named(pattern, src, args.kind, "--name")
        for path in (dst, *sides.values()):
            if path in seen:
                raise InputError(
                    f"{seen[path].name} and {src.name} would both write {path.name}: put {{stem}} in the names"
                )
            if path.resolve() == src.resolve():
                raise InputError(
                    f"{src.name} would be overwritten by its own output: choose another --outdir or --name"
                )
            seen[path] = src
        items.append(_Item(src, dst, sides.get("--table"), sides.get("--geojson"), sides.get("--preview")))
    return items


def _check(args: argparse.Namespace) -> None:
    """The options that do not go together, before any file is read."""
    args.batch = args.dir is not None or len(args.input) != 1 or args.outdir is not None
    if not args.input and args.dir is None:
        raise InputError("give an input image, several, or --dir DIR")
    if args.batch:
        if args.output is not None:
            raise InputError("with several inputs or --dir, give --outdir DIR (and --name PATTERN), not -o")
        if args.outdir is None and not args.into_input:
            raise InputError("with several inputs or --dir, give --outdir DIR for the outputs")
        if args.scheduler or args.workers:
            raise InputError("a cluster run takes one input at a time")
    else:
        if args.into_input == (args.output is not None):
            raise InputError(
                "give -o OUT (a TIFF or an .ome.zarr), or --into-input to add the labels to the input store"
            )
        if args.name is not None or args.skip_existing:
            raise InputError("--name and --skip-existing go with --outdir (several inputs or --dir)")
    if args.pyramid and args.kind != "labels":
        raise InputError("--pyramid applies to labels output, not probabilities")
    if args.scheduler and args.workers:
        raise InputError("give --scheduler ADDRESS (an existing cluster) or --workers N (a local one), not both")
    if args.block is not None and not (args.scheduler or args.workers or os.environ.get("DASK_SCHEDULER_ADDRESS")):
        raise InputError("--block applies to cluster runs (--scheduler or --workers)")
    if args.min_area is not None and args.kind != "instances":
        raise InputError("--min-area applies to --kind instances")
    if args.preview is not None:
        if args.preview.suffix.lower() != ".png":
            raise InputError(f"--preview writes a PNG: give a path ending in .png, got {args.preview}")
        if not args.batch and not args.preview.parent.is_dir():
            raise InputError(f"output directory does not exist: {args.preview.parent}")
        if args.scheduler or args.workers:
            raise InputError("--preview is drawn on this machine: not with --scheduler or --workers")


def _segment(args: argparse.Namespace) -> int:
    _check(args)
    items = _items(args, _inputs(args))
    if not args.batch:
        return _single(args, items[0])
    return _batch(args, items)


def _options(args: argparse.Namespace, item: _Item) -> Options:
    return Options(
        output=args.kind,
        tile_size=args.tile_size,
        stride=args.stride,
        pyramid=args.pyramid,
        series=args.series,
        ngff=args.ngff,
        label_name=args.label_name,
        min_area=args.min_area,
        table=item.table,
        geojson=item.geojson,
        diameter=args.diameter,
        pixel_size=args.pixel_size,
        fill_holes=not args.keep_holes,
    )


class _Tiles:
    """The progress bar over one file's tiles; it appears once the input is open (a refused
    input or option is one line on stderr)."""

    def __init__(self, args: argparse.Namespace, src: Path, *, position: int = 0, leave: bool = True) -> None:
        self.args, self.src, self.position, self.leave = args, src, position, leave
        self.bar = tqdm(unit="tile", disable=True, file=sys.stderr)
        self.pixels = 0
        self.t0 = time.perf_counter()

    def opened(self, header: ImageHeader, route: Route, tiles: int) -> None:
        if header.series_count > 1:  # a silent choice among several images is a wrong mask waiting to happen
            tqdm.write(
                f"unet-tile: warning: {self.src.name if not self.leave else 'input'} holds {header.series_count}"
                f" series; segmented series"
                f" {header.series} (--series N for another)",
                file=sys.stderr,
            )
        self.pixels = header.pixels // header.channels
        desc = "segment" if self.leave else self.src.name[:24]
        self.bar = tqdm(
            total=tiles,
            unit="tile",
            desc=desc,
            disable=self.args.quiet,
            file=sys.stderr,
            position=self.position,
            leave=self.leave,
        )
        log.info("%s for %s (%.0f MB decoded)", route, self.src, decoded_bytes(header) / 1e6)

    def advance(self, n: int) -> None:
        self.bar.update(n)
        mpx = self.pixels * (self.bar.n / max(self.bar.total or 1, 1)) / 1e6
        self.bar.set_postfix_str(f"{mpx / max(time.perf_counter() - self.t0, 1e-9):.2f} Mpx/s", refresh=False)


def _run_one(args: argparse.Namespace, item: _Item, segmenter: Segmenter | None, tiles: _Tiles) -> Any:
    """Segment one input into its outputs (the preview PNG last); returns the pipeline's report.
    ``segmenter``: the model, loaded already (a batch), or None: loaded here unless on a cluster."""
    options = _options(args, item)
    target = item.dst or item.src
    scheduler = args.scheduler or (None if args.workers else os.environ.get("DASK_SCHEDULER_ADDRESS") or None)
    with contextlib.ExitStack() as stack:
        if item.preview is not None:  # the levels an overview of --preview-size needs, in a scratch file
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unet-preview-")))
            options = replace(options, preview=scratch / "preview.bin", preview_max=args.preview_size)
        try:
            if scheduler or args.workers:
                report = _on_cluster(args, item, scheduler, options, tiles.advance, tiles.opened)
            else:
                report = segment_file(
                    segmenter or load_segmenter(args),
                    item.src,
                    item.dst,
                    options,
                    stream_above_mb=args.stream_above,
                    into_input=args.into_input,
                    progress=tiles.advance,
                    on_open=tiles.opened,
                )
            if options.preview is not None and item.preview is not None:
                png = Preview(options.preview).overview(args.preview_size)
                with atomic_path(item.preview) as part:
                    part.write_bytes(png)
                target = item.preview
        except ClusterError:
            raise
        except OSError as e:  # reads are checked (CorruptImageError): an OSError here is the output's
            raise storage_error(e, f"writing {target}") from None
        finally:
            tiles.bar.close()
    return report


def _single(args: argparse.Namespace, item: _Item) -> int:
    t0 = time.perf_counter()
    report = _run_one(args, item, None, _Tiles(args, item.src))
    if report is not None and report.scale is not None:
        if report.scale.rescaled and not args.quiet:  # the result is at the input's shape; say how it was made
            print(f"unet-tile: {report.scale.describe()}", file=sys.stderr)
        else:
            log.info("%s", report.scale.describe())
    log.info("wrote %s in %.2f s", item.dst or item.src, time.perf_counter() - t0)
    if report is not None and report.objects is not None and not args.quiet:
        print(f"unet-tile: {report.objects} objects", file=sys.stderr)
    return 0


def _batch(args: argparse.Namespace, items: list[_Item]) -> int:
    """Every input with one model: a bad file is reported and skipped (exit 1 at the end, with
    the list); an output that cannot be written (disk full, read-only) stops the run (exit 2)."""
    if args.outdir is not None:
        args.outdir.mkdir(parents=True, exist_ok=True)
    segmenter = load_segmenter(args)  # once for every file
    t0 = time.perf_counter()
    done, skipped, failed = 0, 0, []
    files = tqdm(total=len(items), unit="file", desc="files", disable=args.quiet, file=sys.stderr, position=0)
    try:
        for item in items:
            outputs = [p for p in (item.dst, item.table, item.geojson, item.preview) if p is not None]
            if args.skip_existing and outputs and all(p.exists() for p in outputs):
                skipped += 1
                files.update(1)
                continue
            try:
                report = _run_one(args, item, segmenter, _Tiles(args, item.src, position=1, leave=False))
            except StorageError:
                raise  # every later file would fail alike
            except (InputError, UNetError, TilingError) as e:
                failed.append((item.src, str(e)))
                tqdm.write(f"unet-tile: skipped {item.src}: {e}", file=sys.stderr)
            else:
                done += 1
                if report.scale is not None:
                    log.info("%s: %s", item.src, report.scale.describe())
                if report.objects is not None:
                    log.info("%s: %d objects", item.src, report.objects)
            files.update(1)
    finally:
        files.close()
    summary = f"unet-tile: {done} of {len(items)} segmented in {time.perf_counter() - t0:.1f} s"
    if skipped:
        summary += f", {skipped} skipped (outputs exist)"
    if failed:
        summary += f", {len(failed)} failed:"
    print(summary, file=sys.stderr)
    for src, why in failed:
        print(f"  {src}: {why}", file=sys.stderr)
    return 1 if failed else 0


def _on_cluster(
    args: argparse.Namespace,
    item: _Item,
    scheduler: str | None,
    options: Options,
    advance: Any,
    opened: Any,
) -> Any:
    try:
        from ..cluster import connect, segment_on_cluster  # noqa: PLC0415  (the optional dask extra)
    except ImportError as e:
        raise InputError(f"cluster runs need the dask extra (pip install 'unet-tile[dask]'): {e}") from None
    if not args.verbose:
        logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    return segment_on_cluster(
        lambda: connect(scheduler, args.workers),
        args.checkpoint or default_checkpoint(),
        item.src,
        item.dst,
        options,
        into_input=args.into_input,
        block=args.block,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        backend=args.backend,
        progress=advance,
        on_open=opened,
    )


def _diameter(value: str) -> Diameter:
    try:
        return parse_diameter(value)
    except OptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pixel_size(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"pixel size must be a number of µm, got {value!r}") from None
    if not (math.isfinite(v) and 0 < v <= 1000):
        raise argparse.ArgumentTypeError(f"pixel size must be between 0 and 1000 µm, got {value!r}")
    return v


def register(sub: Any) -> None:
    """Add ``segment`` to the subcommands ``sub``."""
    p = sub.add_parser(
        "segment",
        help="segment a TIFF or OME-Zarr image into a mask",
        description="Segment a TIFF or OME-Zarr image; the output kind follows the -o name.",
    )
    p.add_argument(
        "input",
        type=Path,
        nargs="*",
        help="input TIFF/BigTIFF (2-D, multi-channel or a stack) or OME-Zarr image; several go to --outdir",
    )
    p.add_argument(
        "-o",
        "--output",
        action=_OutputAction,
        metavar="OUT",
        default=None,
        help="output: OUT.tif (TIFF), OUT.ome.tif with --pyramid, or OUT.ome.zarr (OME-Zarr: the image and"
        " labels/NAME); written atomically",
    )
    p.add_argument(
        "--kind",
        default="labels",
        choices=list(KINDS),
        help="what to write: uint8 class ids (default), float32 per-class probabilities, or uint32 instances"
        " (0 = background, 1..N = objects)",
    )
    batch = p.add_argument_group("many images, the model loaded once")
    batch.add_argument(
        "--dir", type=Path, default=None, metavar="DIR", help="segment the images in DIR (and any given)"
    )
    batch.add_argument(
        "--glob", default=None, metavar="PATTERN", help="which files of --dir (default: *.tif, *.tiff and *.zarr)"
    )
    batch.add_argument(
        "--outdir", type=Path, default=None, metavar="OUT", help="where the outputs go (made if missing)"
    )
    batch.add_argument(
        "--name",
        default=None,
        metavar="PATTERN",
        help="output name in --outdir: {stem}, {name}, {kind} (default {stem}_masks.tif, {stem}_probabilities.tif,"
        " {stem}_instances.tif); --table, --geojson and --preview are patterns too",
    )
    batch.add_argument(
        "--skip-existing", action="store_true", help="leave an input whose outputs all exist (a rerun resumes)"
    )
    inst = p.add_argument_group("instances (--kind instances)")
    inst.add_argument(
        "--min-area",
        type=int,
        default=None,
        metavar="PX",
        help="drop objects smaller than PX pixels (default: the checkpoint's minimum)",
    )
    inst.add_argument(
        "--table",
        type=Path,
        default=None,
        metavar="PATH",
        help="a measurement table per object: PATH.csv, or PATH.parquet with pyarrow installed",
    )
    inst.add_argument(
        "--geojson",
        type=Path,
        default=None,
        metavar="PATH",
        help="one polygon per object as GeoJSON that QuPath imports (detections, full-resolution pixels)",
    )
    p.add_argument(
        "--preview",
        type=Path,
        default=None,
        metavar="PNG",
        help="also write an overview PNG: the input as the model saw it (contrast-stretched), with the mask's"
        " outlines in colour (plane 0 of a stack)",
    )
    p.add_argument(
        "--preview-size",
        type=positive_int,
        default=1024,
        metavar="PX",
        help="the overview's longest side at most PX (default 1024; the pyramid level that fits, at least half of it)",
    )
    size = p.add_argument_group("object size (the model's scale)")
    size.add_argument(
        "--diameter",
        type=_diameter,
        default="auto",
        metavar="PX|auto|off",
        help="the nuclei's typical diameter in px: the image is rescaled so that they come out at the model's"
        " size, and the result mapped back to the input's shape (default auto: estimated from a crop of the"
        " image, rescaled only when outside the model's range; off: never rescale)",
    )
    size.add_argument(
        "--pixel-size",
        type=_pixel_size,
        default=None,
        metavar="UM",
        help="µm per px: rescale to the model's pixel size instead (the checkpoint's; the demo model's is nominal,"
        " a 10 µm nucleus at its native diameter)",
    )
    size.add_argument(
        "--keep-holes",
        action="store_true",
        help="labels: keep holes inside nuclei (default: filled, as nuclei are simply connected)",
    )
    p.add_argument("--tile-size", type=positive_int, default=388, help="output tile size: 388 (default), 644, 900, ...")
    p.add_argument(
        "--stride",
        type=positive_int,
        default=None,
        help="tile step; default is seam-free (a multiple of 16); 388 = paper layout",
    )
    add_model_options(p)
    p.add_argument(
        "--stream-above",
        type=float,
        default=DEFAULT_STREAM_ABOVE_MB,
        metavar="MB",
        help=f"stream images whose decoded size exceeds MB MiB (windowed reads, tiled BigTIFF output; default: {DEFAULT_STREAM_ABOVE_MB}, 0 = always)",
    )
    p.add_argument(
        "--pyramid", action="store_true", help="write a pyramidal OME-TIFF (labels; implies the streamed path)"
    )
    p.add_argument(
        "--series",
        type=_series_index,
        default=0,
        metavar="N",
        help="which image series of the file to segment (default 0; a warning says when there are several)",
    )
    p.add_argument(
        "--ngff",
        default="0.4",
        choices=list(NGFF_VERSIONS),
        help="NGFF version of a new OME-Zarr output: 0.4 (Zarr v2, default: what most viewers open) or 0.5 (Zarr v3)",
    )
    p.add_argument(
        "--into-input",
        action="store_true",
        help="add the labels to the input OME-Zarr store (labels/NAME) instead of writing -o",
    )
    p.add_argument(
        "--label-name",
        default="unet",
        metavar="NAME",
        type=_label_name,
        help="name of the labels group in an OME-Zarr output (default: unet)",
    )
    cluster = p.add_argument_group("on a Dask cluster (the dask extra)")
    cluster.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        default=None,
        help="run the blocks on the Dask scheduler at ADDRESS (tcp://host:8786; default: $DASK_SCHEDULER_ADDRESS);"
        " input, checkpoint and an OME-Zarr output must be at paths every worker can read",
    )
    cluster.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="run the blocks on a local Dask cluster of N worker processes (one thread each)",
    )
    cluster.add_argument(
        "--block",
        type=positive_int,
        default=None,
        metavar="PX",
        help="block side in output pixels: a multiple of the tile stride (and of 256 for OME-Zarr); default 3072",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_segment)
