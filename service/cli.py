"""The ``unet-tile`` command line: ``segment`` (and the subcommands other modules add).

Exit codes: 0 success; 2 bad input or usage, or an output that cannot be written (disk
full, disk quota exceeded, read-only file system, permission denied): a one-line message
on stderr and no output file left behind (not even a partial one); 1 an unexpected
failure; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

import tiling
from tiling import TilingError
from unet import UNetError, load_checkpoint

from .errors import InputError, StorageError, is_storage_full, storage_error
from .io import read_header, read_image, write_tiff_atomic
from .paths import default_checkpoint
from .segmenter import Segmenter
from .streaming import DEFAULT_STREAM_ABOVE_MB, decoded_bytes, segment_file, should_stream

__all__ = ["USER_ERRORS", "add_model_options", "build_parser", "load_segmenter", "main", "positive_int"]

log = logging.getLogger("service")

USER_ERRORS: tuple[type[Exception], ...] = (InputError, UNetError, TilingError, StorageError)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _series_index(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a series index >= 0, got {text}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: the bundled demo model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="compute precision (default auto: bf16 where the CPU/GPU has native bf16, ~2.5x faster than fp32 on"
        " such CPUs at >= 99.9%% label agreement, else fp32; fp32: exact seam-free tiling)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="tiles per forward pass (default: chosen for the device: cache-sized on the CPU, from free memory on CUDA)",
    )


def load_segmenter(args: argparse.Namespace) -> Segmenter:
    path = args.checkpoint or default_checkpoint()
    return Segmenter(load_checkpoint(path), device=args.device, precision=args.precision, batch_size=args.batch_size)


def _segment(args: argparse.Namespace) -> int:
    if args.input.resolve() == args.output.resolve():
        raise InputError("output path must differ from the input path")
    if not args.input.is_file():
        raise InputError(f"input file not found: {args.input}")
    if not args.output.parent.is_dir():
        raise InputError(f"output directory does not exist: {args.output.parent}")
    if args.pyramid and args.output_kind != "labels":
        raise InputError("--pyramid applies to labels output, not probabilities")
    header = read_header(args.input, series=args.series)
    if header.series_count > 1:  # say so: a silent choice among several images is a wrong mask waiting to happen
        print(
            f"unet-tile: warning: input holds {header.series_count} series; segmented series {header.series}"
            " (--series N for another)",
            file=sys.stderr,
        )
    segmenter = load_segmenter(args)
    segmenter.check(header)
    total = segmenter.count_tiles(header, args.tile_size, args.stride)
    streamed = should_stream(header, args.stream_above, output=args.output_kind, pyramid=args.pyramid)
    log.info(
        "%s path for %s (%.0f MB decoded)",
        "streamed" if streamed else "in-memory",
        args.input,
        decoded_bytes(header) / 1e6,
    )
    t0 = time.perf_counter()
    with tqdm(total=total, unit="tile", desc="segment", disable=args.quiet, file=sys.stderr) as bar:

        def advance(n: int) -> None:
            bar.update(n)
            elapsed = time.perf_counter() - t0
            mpx = header.pixels / header.channels * (bar.n / total) / 1e6
            bar.set_postfix_str(f"{mpx / max(elapsed, 1e-9):.2f} Mpx/s", refresh=False)

        writing = f"writing {args.output}"
        if streamed:
            try:  # reads are checked (CorruptImageError): an OSError here is the output's
                segment_file(
                    segmenter,
                    args.input,
                    args.output,
                    tile_size=args.tile_size,
                    stride=args.stride,
                    pyramid=args.pyramid,
                    progress=advance,
                    series=args.series,
                )
            except OSError as e:
                raise storage_error(e, writing) from None
        else:
            image = read_image(args.input, series=args.series)
            result = segmenter.segment(
                image, output=args.output_kind, tile_size=args.tile_size, stride=args.stride, progress=advance
            )
            del image
            try:
                write_tiff_atomic(args.output, header, result)
            except OSError as e:
                raise storage_error(e, writing) from None
    log.info("wrote %s in %.2f s", args.output, time.perf_counter() - t0)
    return 0


def _add_segment(sub: Any) -> None:
    p = sub.add_parser("segment", help="segment a TIFF image into a mask", description="Segment a TIFF image.")
    p.add_argument("input", type=Path, help="input TIFF (2-D, multi-channel or a stack)")
    p.add_argument(
        "-o", dest="output", metavar="OUT.tif", type=Path, required=True, help="output TIFF (written atomically)"
    )
    p.add_argument(
        "--output",
        dest="output_kind",
        default="labels",
        choices=["labels", "probabilities"],
        help="what to write: uint8 class ids (default) or float32 per-class probabilities",
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_segment)


# Subcommands: each registers its parser and sets ``func(args) -> exit code``.
REGISTRARS: list[Callable[[Any], None]] = [_add_segment]


def _optional_registrars() -> list[Callable[[Any], None]]:
    found = []
    for module_name in ("service.server", "service.training_cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        found.append(module.register)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-tile", description="Large-image U-Net segmentation.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS + _optional_registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # before any worker thread exists, so that the server's and the jobs' inference threads
    # share the main heap too (see tiling.keep_freed_memory: page faults on every pass otherwise)
    tiling.keep_freed_memory()
    try:
        return int(args.func(args))
    except USER_ERRORS as e:
        print(f"unet-tile: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_storage_full(e):
            raise
        doing = f"writing {e.filename}" if e.filename else "writing"
        print(f"unet-tile: error: {storage_error(e, doing)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unet-tile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
