"""Instances of a large image on the streamed path: ``python -m bench.instances``.

Writes a ``--size`` x ``--size`` uint16 tiled BigTIFF of synthetic nuclei (``unet.synth``
images of 1024 x 1024 laid side by side; 8 different ones), then runs, as child processes,

1. ``unet-tile segment big.tif -o labels.tif`` (class labels: the baseline), and
2. ``unet-tile segment big.tif -o inst.tif --kind instances --table objects.csv``,

with the same model and options, and reports each one's wall time and peak RSS
(``ru_maxrss`` of the child), the object count, and the ratios of 2. against 1. from the same
run. ``--geojson`` adds the shapes to 2.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .run import _cpu_name, emit

__all__ = ["main", "write_nuclei"]

_PIECE = 1024


def write_nuclei(path: Path, size: int, *, seed: int = 7, piece: int = _PIECE) -> None:
    """A size x size uint16 BigTIFF of synthetic nuclei (8 different ``piece``-px images side by
    side), written tile by tile (memory O(tiles))."""
    from unet.synth import synth_image  # noqa: PLC0415

    piece = min(piece, size)
    pieces = [synth_image(np.random.default_rng([seed, k]), (piece, piece), dtype="uint16").image for k in range(8)]
    tile = 256

    def tiles() -> Iterator[np.ndarray[Any, Any]]:
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                image = pieces[((y // piece) * 7 + (x // piece)) % len(pieces)]
                t = image[y % piece : y % piece + tile, x % piece : x % piece + tile]
                if t.shape != (tile, tile):
                    t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])))
                yield t

    tifffile.imwrite(
        path, tiles(), shape=(size, size), dtype=np.uint16, tile=(tile, tile), bigtiff=True, compression="zlib"
    )


_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
)


def threshold_checkpoint(path: Path) -> Path:
    """A 2-class width-2 U-Net whose 'nucleus' logit is the normalized input minus 0.5: objects
    are the bright nuclei, at a fraction of the demo model's compute (the instance stage, not
    the network, is what ``--threshold-model`` measures)."""
    import torch  # noqa: PLC0415

    import unet  # noqa: PLC0415

    model = unet.UNet(unet.UNetConfig(base_width=2, batch_norm=False))
    with torch.no_grad():  # every layer passes the (centre) input through: channel 0 of each conv
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight[0, 0, 1, 1] = 1.0
            if isinstance(m, torch.nn.ConvTranspose2d):
                m.weight[0, 0] = 1.0
        model.head.weight[1, 0, 0, 0] = 1.0
        assert model.head.bias is not None  # the 1x1 head always has one
        model.head.bias[1] = -0.5
    unet.save_checkpoint(path, model, class_names=["background", "nucleus"], weights_dtype="float32")
    return path


def _run(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` under a fresh interpreter that reports its one child's peak RSS (KiB)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    lines = done.stderr.splitlines()
    peak_kib = int(lines[-1])
    objects = next((line.split()[1] for line in lines if line.endswith(" objects")), None)
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(peak_kib / 1024, 1), "objects": objects}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instances", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32768)
    p.add_argument("--dir", type=Path, default=None, help="where the image and outputs go (default: a temp dir)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled demo model")
    p.add_argument(
        "--threshold-model",
        action="store_true",
        help="a thresholding 2-class checkpoint instead of the demo model (fast: measures the instance stage)",
    )
    p.add_argument("--precision", default="fp32")
    p.add_argument("--geojson", action="store_true", help="also write the shapes")
    p.add_argument("--skip-labels", action="store_true", help="only the instances run")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        big = d / "big.tif"
        t0 = time.perf_counter()
        write_nuclei(big, args.size)
        print(f"wrote {big} ({args.size}^2 uint16) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        exe = str(Path(sys.executable).with_name("unet-tile"))
        checkpoint = threshold_checkpoint(d / "threshold.safetensors") if args.threshold_model else args.checkpoint
        common = ["--precision", args.precision, *(["--checkpoint", str(checkpoint)] if checkpoint else [])]
        rows: list[dict[str, Any]] = []
        if not args.skip_labels:
            rows.append(
                {"row": "labels", **_run([exe, "segment", str(big), "-o", str(d / "labels.tif"), *common, "-q"])}
            )
        cmd = [exe, "segment", str(big), "-o", str(d / "inst.tif"), "--kind", "instances"]
        cmd += ["--table", str(d / "objects.csv"), *(["--geojson", str(d / "nuclei.geojson")] if args.geojson else [])]
        inst = _run([*cmd, *common])  # without -q: the object count is printed
        rows.append({"row": "instances" + (" + geojson" if args.geojson else "") + " + table", **inst})
        if not args.skip_labels:
            base = rows[0]
            rows[-1]["time_vs_labels"] = round(inst["seconds"] / base["seconds"], 2)
        report = {
            "bench": "instances",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu": _cpu_name(),
            "size": args.size,
            "model": "threshold" if args.threshold_model else str(args.checkpoint or "demo"),
            "rows": rows,
        }
        lines = [f"instances bench, {args.size}x{args.size}, {report['cpu']}, {report['date']}"]
        lines.append(f"{'row':<28} {'seconds':>8} {'peak RSS MiB':>13} {'objects':>9} {'time / labels':>14}")
        for r in rows:
            ratio = r.get("time_vs_labels", "")
            lines.append(
                f"{r['row']:<28} {r['seconds']:>8} {r['peak_rss_mib']:>13} {r['objects'] or '':>9} {ratio:>14}"
            )
        emit("\n".join(lines), report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
