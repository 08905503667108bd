"""``unet-tile export`` and ``unet-tile import``: the model for other tools, and back.

* ``export [CHECKPOINT] --format onnx|torchscript|bioimageio -o PATH``: the fp32 network as
  ONNX or TorchScript, or a bioimage.io model package (a zip with both, tested with
  ``bioimageio.core``'s model test before it is written); the checkpoint defaults to the
  bundled demo model. ONNX needs the ``onnx`` extra, the package the ``bioimageio`` extra.
* ``import PACKAGE -o CHECKPOINT.safetensors``: a bioimage.io package (zip or folder) whose
  TorchScript or ONNX weights are unet-tile's U-Net, as a checkpoint; nothing from the
  package is run (:func:`service.export.import_bioimageio`).

The library side is :mod:`service.export`; every file is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from unet import load_checkpoint
from unet.export import DEFAULT_OPSET

from ..errors import InputError, storage_error
from ..export import PackageTestError, export_bioimageio, export_onnx, export_torchscript, import_bioimageio
from ..paths import default_checkpoint
from ..sources import read_image
from .common import positive_int

__all__ = ["FORMATS", "WEIGHTS", "register"]

FORMATS = ("onnx", "torchscript", "bioimageio")
WEIGHTS = ("auto", "torchscript", "onnx")


def _output(path: Path) -> Path:
    if path.is_dir():
        raise InputError(f"output is a directory: {path} (give a file name)")
    if not path.parent.is_dir():
        raise InputError(f"output directory not found: {path.parent}")
    return path


def _megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def _export(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise InputError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    out = _output(args.output)
    source = args.checkpoint or default_checkpoint()
    checkpoint = load_checkpoint(source)
    sample = None
    if args.sample is not None:
        if args.format != "bioimageio":
            raise InputError("--sample is for --format bioimageio (the package's test input)")
        sample = read_image(args.sample).planes[0]  # (C, Y, X) of the first plane
    try:
        if args.format == "torchscript":
            export_torchscript(checkpoint, out)
        elif args.format == "onnx":
            export_onnx(checkpoint, out, opset=args.opset)
        else:
            result = export_bioimageio(
                checkpoint,
                out,
                source=Path(source).name,
                name=args.name,
                authors=args.author,
                license=args.license,
                tags=args.tag,
                sample=sample,
                opset=args.opset,
                test=not args.no_test,
            )
            if result is not None:
                print(
                    f"export: bioimageio.core model test {result.status} ({len(result.checks)} checks)", file=sys.stderr
                )
    except PackageTestError as e:
        print(f"unet-tile: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        raise storage_error(e, f"writing {out}") from None
    print(f"export: wrote {out} ({args.format}, {_megabytes(out)}) from {source}", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    if args.weights not in WEIGHTS:
        raise InputError(f"unknown --weights {args.weights!r}; choose one of {', '.join(WEIGHTS)}")
    out = _output(args.output)
    try:
        r = import_bioimageio(args.package, out, weights=args.weights)
    except OSError as e:
        raise storage_error(e, f"writing {out}") from None
    c = r.config
    print(
        f"import: wrote {out} (sha256 {r.sha256}) from the {r.weights_format} weights of {args.package}: "
        f"U-Net depth {c.depth}, width {c.base_width}, classes {', '.join(r.class_names)}; "
        f"test output reproduced (max abs difference {r.max_abs_diff:.2g})",
        file=sys.stderr,
    )
    return 0


def register(sub: Any) -> None:
    """Add ``export`` and ``import`` to the ``unet-tile`` subcommands."""
    p = sub.add_parser(
        "export",
        help="the model as ONNX, TorchScript or a bioimage.io model package",
        description="Write the checkpoint's fp32 network as ONNX or TorchScript (batch, height and width free; "
        "valid sizes only), or as a bioimage.io model package with both (tested with bioimageio.core first).",
    )
    p.add_argument(
        "checkpoint", nargs="?", type=Path, default=None, help="checkpoint file (default: the bundled demo model)"
    )
    p.add_argument("--format", required=True, metavar="{" + ",".join(FORMATS) + "}", help="what to write")
    p.add_argument("-o", "--output", type=Path, required=True, help="the file to write (a package is a .zip)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    g = p.add_argument_group("bioimage.io package")
    g.add_argument("--name", default=None, help="the model's name (default: unet-tile <checkpoint name>)")
    g.add_argument(
        "--author", action="append", default=[], help="an author (repeat for more; default: unet-tile contributors)"
    )
    g.add_argument("--license", default="MIT", help="SPDX license id of the weights (default MIT, the project's)")
    g.add_argument("--tag", action="append", default=[], help="an extra tag (repeat for more)")
    g.add_argument(
        "--sample",
        type=Path,
        default=None,
        help="TIFF whose central valid window (up to 380 px) is the test input and cover (default: synthetic nuclei)",
    )
    g.add_argument("--no-test", action="store_true", help="write the package without running bioimageio.core's test")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "import",
        help="a bioimage.io model package (TorchScript or ONNX weights of this U-Net) as a checkpoint",
        description="Rebuild a unet-tile checkpoint from a bioimage.io package (zip or folder): the architecture "
        "from its config.unet_tile or the weights' shapes, normalization from its preprocessing; the rebuilt network "
        "must reproduce the package's test output. Nothing from the package is run.",
    )
    p.add_argument("package", type=Path, help="the package: a .zip, a folder, or its rdf.yaml")
    p.add_argument("-o", "--output", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument(
        "--weights",
        default="auto",
        metavar="{" + ",".join(WEIGHTS) + "}",
        help="which weights to read (default auto: TorchScript, else ONNX)",
    )
    p.set_defaults(func=_import)
