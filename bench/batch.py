"""A folder of images, one ``unet-tile segment`` per file against one batch run: ``python -m bench.batch``.

Writes ``--n`` synthetic nucleus images (``unet.synth``, ``--size`` square, uint16), then times,
as child processes with the same model and options,

1. ``unet-tile segment IMG -o OUT -q`` once per image (each run pays the start: imports,
   loading and warming up the model), and
2. ``unet-tile segment --dir IN --outdir OUT -q`` once (the model loaded once),

checks that both give byte-identical masks, and reports the seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .run import _cpu_name, emit

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20, help="images (default 20)")
    p.add_argument("--size", type=int, default=512, help="image side (default 512)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled demo model")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    from unet.synth import synth_image  # noqa: PLC0415

    exe = str(Path(sys.executable).with_name("unet-tile"))
    model = ["--precision", args.precision, *(["--checkpoint", str(args.checkpoint)] if args.checkpoint else [])]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, one, many = d / "in", d / "single", d / "batch"
        for folder in (src, one):
            folder.mkdir()
        for i in range(args.n):
            image = synth_image(np.random.default_rng(i), (args.size, args.size), dtype="uint16").image
            tifffile.imwrite(src / f"img{i:03d}.tif", image, compression="zlib")
        t0 = time.perf_counter()
        for path in sorted(src.iterdir()):
            subprocess.run(
                [exe, "segment", str(path), "-o", str(one / f"{path.stem}_masks.tif"), "-q", *model], check=True
            )
        singles = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([exe, "segment", "--dir", str(src), "--outdir", str(many), "-q", *model], check=True)
        batch = time.perf_counter() - t0
        same = all((many / f.name).read_bytes() == f.read_bytes() for f in one.iterdir())
        rows: list[dict[str, Any]] = [
            {"row": f"{args.n} single runs", "seconds": round(singles, 1)},
            {"row": "one batch run", "seconds": round(batch, 1), "speedup": round(singles / batch, 2)},
        ]
        report = {
            "bench": "batch",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu": _cpu_name(),
            "images": f"{args.n} x {args.size}^2 uint16",
            "model": str(args.checkpoint or "demo"),
            "identical_masks": same,
            "rows": rows,
        }
        lines = [f"batch bench, {report['images']}, {report['cpu']}, {report['date']}"]
        lines += [f"{r['row']:<18} {r['seconds']:>8} s {r.get('speedup', ''):>6}" for r in rows]
        lines.append(f"masks identical: {same}")
        emit("\n".join(lines), report, args.json)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
