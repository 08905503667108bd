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
from pathlib import Path

import tifffile

import tiling
from service.segmenter import Segmenter
from tiling.openvino import openvino_available
from unet.checkpoint import DEMO_CHECKPOINT, load_checkpoint

__all__ = ["main"]


def _modes() -> list[tuple[str, str]]:
    modes = [("torch", "bf16")]
    if openvino_available():
        modes += [("openvino", "fp32"), ("openvino", "bf16")]
        if importlib.util.find_spec("nncf") is not None:
            modes.append(("openvino", "int8"))
    return modes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.split("\n\n")[0])
    p.add_argument("sets", nargs="+", type=Path, help="folders holding images/*.tif")
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    args = p.parse_args(argv)
    ck = load_checkpoint(args.checkpoint)
    reference = Segmenter(ck, device="cpu", precision="fp32", backend="torch").predictor
    modes = _modes()
    predictors = {m: Segmenter(ck, device="cpu", precision=m[1], backend=m[0]).predictor for m in modes}
    columns = []
    for folder in args.sets:
        same, worst, total = dict.fromkeys(modes, 0), dict.fromkeys(modes, 1.0), 0
        for path in sorted((folder / "images").glob("*.tif")):
            image = tifffile.imread(path)
            affine = ck.normalization.fit(image[None])
            ref = tiling.segment(image, reference, normalize=affine)
            total += ref.size
            for mode in modes:
                agree = int((tiling.segment(image, predictors[mode], normalize=affine) == ref).sum())
                same[mode] += agree
                worst[mode] = min(worst[mode], agree / ref.size)
        columns.append((folder.name, total, same, worst))
    print(
        "| backend, precision | "
        + " | ".join(f"{n} ({t / 1e6:.1f} Mpx) | worst image" for n, t, _, _ in columns)
        + " |"
    )
    print("| --- |" + " ---: | ---: |" * len(columns))
    for mode in modes:
        cells = " | ".join(f"{s[mode] / t:.3%} | {w[mode]:.3%}" for _, t, s, w in columns)
        print(f"| {mode[0]} {mode[1]} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
