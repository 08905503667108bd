"""``python -m bench.agreement DIR...``: label agreement of every backend and precision with
eager fp32, through the engine, on the images of held-out sets (``unet-tile synth`` folders).

    unet-tile synth -o /tmp/unet-demo/val --n 30 --seed 1001
    python -m bench.agreement /tmp/unet-demo/val /tmp/unet-demo/test100

Prints one Markdown row per backend and precision: the share of equal labels per set, and
its worst image. Accuracy, not speed: the numbers do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy.typing as npt
import tifffile

import tiling
from service.segmenter import Segmenter
from tiling.openvino import openvino_available
from unet.checkpoint import DEMO_CHECKPOINT, Checkpoint, load_checkpoint

__all__ = ["label_agreement", "main"]


def _modes() -> list[tuple[str, str]]:
    modes = [("torch", "bf16")]
    if openvino_available():
        modes += [("openvino", "fp32"), ("openvino", "bf16")]
        if importlib.util.find_spec("nncf") is not None:
            modes.append(("openvino", "int8"))
    return modes


def label_agreement(
    checkpoint: Checkpoint,
    images: Iterable[npt.NDArray[Any]],
    reference: tiling.Predictor,
    predictors: Mapping[str, tiling.Predictor],
) -> dict[str, Any]:
    """Each predictor's labels against ``reference``'s, through the engine with the
    checkpoint's normalization: ``agreement`` (equal pixels over all images),
    ``worst_image`` (per predictor) and ``pixels``."""
    same, worst, total = dict.fromkeys(predictors, 0), dict.fromkeys(predictors, 1.0), 0
    for image in images:
        affine = checkpoint.normalization.fit(image[None])
        ref = tiling.segment(image, reference, normalize=affine)
        total += ref.size
        for name, predictor in predictors.items():
            agree = int((tiling.segment(image, predictor, normalize=affine) == ref).sum())
            same[name] += agree
            worst[name] = min(worst[name], agree / ref.size)
    return {"agreement": {n: same[n] / total for n in predictors}, "worst_image": worst, "pixels": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("sets", nargs="+", type=Path, help="folders holding images/*.tif")
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    args = p.parse_args(argv)
    ck = load_checkpoint(args.checkpoint)
    reference = Segmenter(ck, device="cpu", precision="fp32", backend="torch").predictor
    predictors = {f"{b} {p}": Segmenter(ck, device="cpu", precision=p, backend=b).predictor for b, p in _modes()}
    columns = []
    for folder in args.sets:
        images = (tifffile.imread(path) for path in sorted((folder / "images").glob("*.tif")))
        columns.append((folder.name, label_agreement(ck, images, reference, predictors)))
    head = " | ".join(f"{name} ({r['pixels'] / 1e6:.1f} Mpx) | worst image" for name, r in columns)
    print(f"| backend, precision | {head} |")
    print("| --- |" + " ---: | ---: |" * len(columns))
    for mode in predictors:
        cells = " | ".join(f"{r['agreement'][mode]:.3%} | {r['worst_image'][mode]:.3%}" for _, r in columns)
        print(f"| {mode} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
