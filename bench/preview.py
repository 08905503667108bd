"""What a job's preview costs on a large image: ``python -m bench.preview``.

Writes (or takes, ``--image``) a ``--size`` x ``--size`` uint16 tiled BigTIFF of synthetic
nuclei (:func:`bench.instances.write_nuclei`), then segments it on the streamed path as
child processes, with the same model and options,

1. labels alone (the baseline), and
2. labels and the full preview pyramid, as a job builds it (every level, for zooming),

and reports each one's wall time, peak RSS (``ru_maxrss`` of the child) and what it wrote,
with the ratio of 2. against 1. from the same run. ``--threshold-model`` uses a thresholding
checkpoint, so the network costs almost nothing and the preview's own share shows.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .instances import threshold_checkpoint, write_nuclei
from .run import _cpu_name, emit

__all__ = ["main"]


def _child(mode: str, image: Path, out: Path, checkpoint: str, precision: str) -> None:
    """One run in this process; prints its peak RSS (KiB) last."""
    import unet  # noqa: PLC0415
    from service.paths import default_checkpoint  # noqa: PLC0415
    from service.pipeline import Options, segment_file  # noqa: PLC0415
    from service.segmenter import Segmenter  # noqa: PLC0415

    ck = unet.load_checkpoint(checkpoint or default_checkpoint())
    segmenter = Segmenter(ck, device="cpu", precision=precision)
    options = Options(preview=out / "preview.bin") if mode == "preview" else Options()
    segment_file(segmenter, image, out / "mask.tif", options, stream_above_mb=0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _run(mode: str, image: Path, out: Path, checkpoint: str, precision: str) -> dict[str, Any]:
    out.mkdir()
    cmd = [sys.executable, "-m", "bench.preview", "--child", mode, str(image), str(out), checkpoint, precision]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    return {
        "row": "labels" if mode == "labels" else "labels + preview pyramid",
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(int(done.stdout.split()[-1]) / 1024, 1),
        "mask_bytes": sizes.get("mask.tif", 0),
        "preview_bytes": sizes.get("preview.bin", 0),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], Path(argv[2]), Path(argv[3]), argv[4], argv[5])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.preview", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32768)
    p.add_argument("--image", type=Path, default=None, help="an existing image instead of writing one")
    p.add_argument("--dir", type=Path, default=None, help="where the image and outputs go (default: a temp dir)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled demo model")
    p.add_argument("--threshold-model", action="store_true", help="a thresholding checkpoint (fast)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        image = args.image
        if image is None:
            image = d / "big.tif"
            write_nuclei(image, args.size)
        checkpoint = threshold_checkpoint(d / "threshold.safetensors") if args.threshold_model else args.checkpoint
        ck = str(checkpoint or "")
        rows = [_run(mode, image, d / mode, ck, args.precision) for mode in ("labels", "preview")]
        rows[1]["time_vs_labels"] = round(rows[1]["seconds"] / rows[0]["seconds"], 2)
        report = {
            "bench": "preview",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpu": _cpu_name(),
            "image": str(args.image or f"{args.size}^2 synthetic nuclei"),
            "model": "threshold" if args.threshold_model else str(args.checkpoint or "demo"),
            "rows": rows,
        }
        lines = [f"preview bench, {report['image']}, {report['cpu']}, {report['date']}"]
        lines.append(
            f"{'row':<26} {'seconds':>8} {'peak RSS MiB':>13} {'mask MB':>8} {'preview MB':>11} {'time / labels':>14}"
        )
        for r in rows:
            lines.append(
                f"{r['row']:<26} {r['seconds']:>8} {r['peak_rss_mib']:>13} {r['mask_bytes'] / 1e6:>8.1f}"
                f" {r['preview_bytes'] / 1e6:>11.1f}"
                f" {r.get('time_vs_labels', ''):>14}"
            )
        emit("\n".join(lines), report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
