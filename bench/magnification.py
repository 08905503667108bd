"""``python -m bench.magnification``: the bundled model on a real image at 1x, 2x and 3x.

The real widefield image in ``tests/data/real`` (nuclei ~25 px across) is enlarged 2x and 3x
(bicubic: a stand-in for a higher magnification) with its mask enlarged by nearest neighbour,
and segmented with default options (``--diameter auto``) and with ``--diameter off``. Prints
one Markdown row per scale and setting: the scale chosen, foreground Dice, and instance F1 at
IoU 0.5. Accuracy, not speed: the numbers do not depend on the machine's load.

    python -m bench.magnification [--checkpoint CKPT] [--scales 1 2 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile
from scipy import ndimage

from service.evaluate import dice, match_instances
from service.io import ImageData, ImageHeader
from service.pipeline import Options, resolve, segment_image
from service.segmenter import Segmenter
from service.sources import ArraySource
from unet.checkpoint import DEMO_CHECKPOINT, load_checkpoint

__all__ = ["enlarge", "main"]

REAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "real"


def enlarge(image: npt.NDArray[Any], mask: npt.NDArray[Any], k: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``image`` enlarged k times (bicubic, rounded back to its dtype) and ``mask`` by nearest."""
    if k == 1:
        return image, mask
    big = ndimage.zoom(image.astype(np.float32), k, order=3)
    top = np.iinfo(image.dtype).max if image.dtype.kind in "ui" else np.inf
    return np.clip(np.rint(big), 0, top).astype(image.dtype), np.kron(mask, np.ones((k, k), mask.dtype))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.magnification", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"])
    args = p.parse_args(argv)
    seg = Segmenter(load_checkpoint(args.checkpoint), device="cpu", precision="fp32", backend=args.backend)
    image0 = tifffile.imread(REAL / "nuclei-widefield.tif")
    mask0 = tifffile.imread(REAL / "nuclei-widefield-mask.tif")
    print("| magnification | diameter | scale chosen (objects) | Dice | instance F1 (matched / false / missed) |")
    print("| --- | --- | --- | --- | --- |")
    for k in args.scales:
        image, mask = enlarge(image0, mask0, k)
        data = ImageData(ImageHeader(image.shape, "YX", image.dtype, None, None, None), image[None, None])
        for diameter in ("auto", "off"):
            options = resolve(seg, ArraySource.of(data), Options(diameter=diameter))
            scale = options.scale
            assert scale is not None
            labels = segment_image(seg, data, options)[0]
            ids = segment_image(seg, data, Options(output="instances", scale=scale))[0]
            m = match_instances(ids, mask)
            seen = "" if scale.diameter_px is None else f" (~{scale.diameter_px:.0f} px)"
            print(
                f"| {k}x ({image.shape[1]}x{image.shape[0]}) | {diameter} | {scale.factor:.3g}{seen} |"
                f" {dice(labels > 0, mask > 0):.4f} | {m.f1:.3f} ({m.tp} / {m.fp} / {m.fn}) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
