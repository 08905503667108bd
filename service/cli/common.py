"""What the ``unet-tile`` subcommands share: the user errors, argument types and the model options.

:data:`USER_ERRORS` are the errors a user can act on; :func:`service.cli.main` prints them
in one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from tiling import TilingError
from unet import UNetError, load_checkpoint

from ..errors import ClusterError, InputError, StorageError
from ..paths import default_checkpoint
from ..segmenter import Segmenter

log = logging.getLogger(__name__)

__all__ = ["USER_ERRORS", "add_model_options", "load_segmenter", "positive_int"]

USER_ERRORS: tuple[type[Exception], ...] = (InputError, UNetError, TilingError, StorageError, ClusterError)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1.

    >>> positive_int("3")
    3
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a positive integer, got 0
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--device``, ``--backend``, ``--precision`` and ``--batch-size``, as
    :func:`load_segmenter` reads them (``--backend`` defaults to ``UNET_BACKEND``, else auto)."""
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: the bundled demo model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (default: auto)")
    p.add_argument(
        "--backend",
        default=os.environ.get("UNET_BACKEND") or "auto",
        choices=["auto", "torch", "openvino"],
        help="runtime (default $UNET_BACKEND, else auto: OpenVINO on the CPU where the 'openvino' extra is"
        " installed, else PyTorch)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16", "int8"],
        help="compute precision (default auto: bf16 where the CPU/GPU has native bf16, ~2.5x faster than fp32 on"
        " such CPUs at >= 99.9%% label agreement, else fp32; fp32: exact seam-free tiling; int8: OpenVINO only)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="tiles per forward pass (default: chosen for the device: cache-sized on the CPU, from free memory on CUDA)",
    )


def load_segmenter(args: argparse.Namespace) -> Segmenter:
    """The segmenter the model options of :func:`add_model_options` ask for."""
    path = args.checkpoint or default_checkpoint()
    segmenter = Segmenter(
        load_checkpoint(path),
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        backend=args.backend,
    )
    p = segmenter.predictor
    log.info(
        "model %s on %s, backend %s, precision %s", segmenter.checkpoint.sha256[:12], p.device, p.backend, p.precision
    )
    return segmenter
