"""``unet-tile segment``: an image in (TIFF or OME-Zarr), its mask (or probabilities) out.

The output kind follows its name: ``.zarr``/``.ome.zarr`` is an OME-Zarr store (the image
and ``labels/<name>``), anything else a TIFF (``--pyramid``: a pyramidal OME-TIFF);
``--into-input`` adds the labels to the input OME-Zarr's own store instead. Every output is
written atomically. The route (decoded or windowed reads, in-memory or streamed writes) is
:func:`service.pipeline.choose_route`'s, from one parse of the input.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from unet.atomic import atomic_path

from ..errors import ClusterError, InputError, storage_error
from ..io import ImageHeader
from ..paths import default_checkpoint
from ..pipeline import DEFAULT_STREAM_ABOVE_MB, Options, Route, decoded_bytes, segment_file
from ..preview import Preview
from ..sources import NGFF_VERSIONS
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


def _segment(args: argparse.Namespace) -> int:
    if args.into_input == (args.output is not None):
        raise InputError("give -o OUT (a TIFF or an .ome.zarr), or --into-input to add the labels to the input store")
    if args.pyramid and args.output_kind != "labels":
        raise InputError("--pyramid applies to labels output, not probabilities")
    if args.scheduler and args.workers:
        raise InputError("give --scheduler ADDRESS (an existing cluster) or --workers N (a local one), not both")
    if args.block is not None and not (args.scheduler or args.workers or os.environ.get("DASK_SCHEDULER_ADDRESS")):
        raise InputError("--block applies to cluster runs (--scheduler or --workers)")
    options = Options(
        output=args.output_kind,
        tile_size=args.tile_size,
        stride=args.stride,
        pyramid=args.pyramid,
        series=args.series,
        ngff=args.ngff,
        label_name=args.label_name,
        min_area=args.min_area,
        table=args.table,
        geojson=args.geojson,
    )
    if args.min_area is not None and args.output_kind != "instances":
        raise InputError("--min-area applies to --output instances")
    if args.preview is not None:
        if args.preview.suffix.lower() != ".png":
            raise InputError(f"--preview writes a PNG: give a path ending in .png, got {args.preview}")
        if not args.preview.parent.is_dir():
            raise InputError(f"output directory does not exist: {args.preview.parent}")
        if args.scheduler or args.workers:
            raise InputError("--preview is drawn on this machine: not with --scheduler or --workers")
    t0 = time.perf_counter()
    # the bar appears once the input is open: a refused input or option is one line on stderr
    bar = tqdm(unit="tile", desc="segment", disable=True, file=sys.stderr)
    pixels = 0

    def opened(header: ImageHeader, route: Route, tiles: int) -> None:
        nonlocal pixels, bar
        if header.series_count > 1:  # a silent choice among several images is a wrong mask waiting to happen
            print(
                f"unet-tile: warning: input holds {header.series_count} series; segmented series {header.series}"
                " (--series N for another)",
                file=sys.stderr,
            )
        pixels = header.pixels // header.channels
        bar = tqdm(total=tiles, unit="tile", desc="segment", disable=args.quiet, file=sys.stderr)
        log.info("%s for %s (%.0f MB decoded)", route, args.input, decoded_bytes(header) / 1e6)

    def advance(n: int) -> None:
        bar.update(n)
        mpx = pixels * (bar.n / max(bar.total or 1, 1)) / 1e6
        bar.set_postfix_str(f"{mpx / max(time.perf_counter() - t0, 1e-9):.2f} Mpx/s", refresh=False)

    target = args.output or args.input
    scheduler = args.scheduler or (None if args.workers else os.environ.get("DASK_SCHEDULER_ADDRESS") or None)
    with contextlib.ExitStack() as stack:
        if args.preview is not None:  # the levels an overview of --preview-size needs, in a scratch file
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unet-preview-")))
            options = replace(options, preview=scratch / "preview.bin", preview_max=args.preview_size)
        try:
            if scheduler or args.workers:
                report = _on_cluster(args, scheduler, options, advance, opened)
            else:
                report = segment_file(
                    load_segmenter(args),
                    args.input,
                    args.output,
                    options,
                    stream_above_mb=args.stream_above,
                    into_input=args.into_input,
                    progress=advance,
                    on_open=opened,
                )
            if options.preview is not None and args.preview is not None:
                png = Preview(options.preview).overview(args.preview_size)
                with atomic_path(args.preview) as part:
                    part.write_bytes(png)
                target = args.preview
        except ClusterError:
            raise
        except OSError as e:  # reads are checked (CorruptImageError): an OSError here is the output's
            raise storage_error(e, f"writing {target}") from None
        finally:
            bar.close()
    log.info("wrote %s in %.2f s", args.output or args.input, time.perf_counter() - t0)
    if report is not None and report.objects is not None and not args.quiet:
        print(f"unet-tile: {report.objects} objects", file=sys.stderr)
    return 0


def _on_cluster(
    args: argparse.Namespace,
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
        args.input,
        args.output,
        options,
        into_input=args.into_input,
        block=args.block,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        progress=advance,
        on_open=opened,
    )


def register(sub: Any) -> None:
    """Add ``segment`` to the subcommands ``sub``."""
    p = sub.add_parser(
        "segment",
        help="segment a TIFF or OME-Zarr image into a mask",
        description="Segment a TIFF or OME-Zarr image; the output kind follows the -o name.",
    )
    p.add_argument("input", type=Path, help="input TIFF/BigTIFF (2-D, multi-channel or a stack) or OME-Zarr image")
    p.add_argument(
        "-o",
        dest="output",
        metavar="OUT",
        type=Path,
        default=None,
        help="output: OUT.tif (TIFF), OUT.ome.tif with --pyramid, or OUT.ome.zarr (OME-Zarr: the image and"
        " labels/NAME); written atomically",
    )
    p.add_argument(
        "--output",
        dest="output_kind",
        default="labels",
        choices=["labels", "probabilities", "instances"],
        help="what to write: uint8 class ids (default), float32 per-class probabilities, or uint32 instances"
        " (0 = background, 1..N = objects)",
    )
    inst = p.add_argument_group("instances (--output instances)")
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
        help=f"stream images whose decoded size exceeds MB (windowed reads, tiled BigTIFF output; default: {DEFAULT_STREAM_ABOVE_MB}, 0 = always)",
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
