"""``python -m bench``: every row on one image in one run, then the table and the ratios.

    python -m bench                        # 4096x4096 uint16, demo checkpoint, all rows
    python -m bench --size 16384 --rows cli --precisions bf16   # the CLI's memory on a big image
    python -m bench --repeat 3 --json out.json                  # best of 3 rounds, results as JSON

Rows run one after another, each in its own subprocess (:mod:`bench.rows`); with
``--repeat N`` the whole sequence runs N times and each row keeps its fastest round, so a
burst of load on a shared machine hits one round, not one row.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from tiling import resolve_device, resolve_precision
from tiling.openvino import openvino_available

from . import baselines, data

__all__ = ["TARGETS", "emit", "main", "render"]

ALL_ROWS = ("ceiling", "engine", "cli", "http", "naive", "monai", "tiles", "agreement")
TARGETS = {  # (row, reference row, at least): output Mpx/s ratios the engine work aims for
    # the ceiling: the best bare network over every backend at that precision
    "engine / ceiling (same precision)": ("engine", "ceiling", 0.9),
    "http / ceiling (same precision)": ("http", "ceiling", 0.85),
    "engine / naive": ("engine", "naive", 3.0),
    "cli / naive": ("cli", "naive", 3.0),
    "engine / monai": ("engine", "monai", 6.0),
    # OpenVINO's engine row against eager PyTorch's best bare network (docs/performance.md)
    "openvino engine / eager ceiling (same precision)": ("engine openvino", "ceiling torch", 1.15),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="image side in pixels (default 4096)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the demo checkpoint (random if missing)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--precisions",
        default=None,
        help="comma list for the ceiling and engine rows (default: fp32 and, where native, bf16); "
        "the CLI, HTTP and tile-size rows use the last one",
    )
    p.add_argument(
        "--backends",
        default=None,
        help="comma list for the ceiling and engine rows (default: torch and, where installed, openvino); the CLI"
        " and HTTP rows use the last one",
    )
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma list of {', '.join(ALL_ROWS)}")
    p.add_argument("--tile-sizes", default="388,644,900", help="engine tile sizes for the 'tiles' rows")
    p.add_argument("--batches", default="1,2,4,8", help="batch sizes the ceiling searches")
    p.add_argument("--search-seconds", type=float, default=1.0, help="time per ceiling candidate")
    p.add_argument("--repeat", type=int, default=1, help="rounds; each row keeps its fastest")
    p.add_argument(
        "--pairs",
        type=int,
        default=2,
        help="engine rows alternate the engine and the ceiling's best configuration this many times (best of each)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in every row (0: torch's default)")
    p.add_argument("--demo-size", type=int, default=1024, help="side of the demo images for the agreement row")
    p.add_argument("--workdir", type=Path, default=None, help="where the image and outputs go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def _run_row(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.rows", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["(no message)"])[-1][:300]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _skip_reason(row: str) -> str | None:
    if row == "http" and importlib.util.find_spec("service.server") is None:
        return "service.server not present: no HTTP row"
    if row == "monai" and not baselines.monai_available():
        return "MONAI not installed (pip install -e '.[bench]')"
    return None


def _int8_available() -> bool:
    return openvino_available() and importlib.util.find_spec("nncf") is not None


def _jobs(
    args: argparse.Namespace, precisions: list[str], main_precision: str, backends: list[str]
) -> list[tuple[str, dict[str, Any]]]:
    """(row name, spec) in run order. Names are ``row precision [backend]``."""
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; expected some of {', '.join(ALL_ROWS)}")
    main_backend = backends[-1]
    jobs: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        if row in ("ceiling", "engine"):
            for b in backends:
                for p in precisions:
                    if p == "int8" and b != "openvino":
                        continue
                    jobs.append((f"{row} {p} {b}", {"row": row, "precision": p, "backend": b}))
        elif row in ("cli", "http"):
            spec = {"row": row, "precision": main_precision, "backend": main_backend}
            jobs.append((f"{row} {main_precision} {main_backend}", spec))
        elif row == "tiles":
            for t in (int(t) for t in args.tile_sizes.split(",")):
                if t != 388 or "engine" not in rows or main_precision not in precisions:
                    spec = {"row": "engine", "precision": main_precision, "backend": main_backend, "tile_size": t}
                    jobs.append((f"engine {main_precision} {main_backend} tile {t}", spec))
        elif row == "naive":
            jobs.append(("naive fp32", {"row": "naive", "precision": "fp32"}))
        elif row == "monai":  # MONAI's default (fp32), and each reduced precision the engine runs
            reduced = [p for p in precisions if p != "int8"]
            jobs += [(f"monai {p}", {"row": "monai", "precision": p}) for p in dict.fromkeys(["fp32", *reduced])]
        elif row == "agreement":
            spec = {"row": "agreement", "precision": "fp32", "backends": backends, "openvino_precisions": precisions}
            jobs.append(("agreement", spec))
    return jobs


def emit(text: str, report: dict[str, Any], json_path: Path | None) -> None:
    """Print a bench's rendered ``text``; with ``--json``, also write its ``report`` there."""
    print(text)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    main_precision = resolve_precision("auto", device)
    precisions = (
        args.precisions.split(",") if args.precisions else sorted({"fp32", main_precision}, key="fp32 bf16 fp16".index)
    )
    main_precision = next(p for p in reversed(precisions) if p != "int8")  # int8: an option, never the default
    default_backends = ["torch", "openvino"] if openvino_available() and device.type == "cpu" else ["torch"]
    backends = args.backends.split(",") if args.backends else default_backends
    if not args.precisions and "openvino" in backends and _int8_available():
        precisions.append("int8")
    with tempfile.TemporaryDirectory(prefix="unet-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        checkpoint, note = data.resolve_checkpoint(args.checkpoint, workdir)
        image = data.bench_image(args.size)
        np.save(workdir / "image.npy", image)
        tifffile.imwrite(workdir / "image.tif", image, tile=(256, 256))  # tiled, as large images usually are
        input_mb = image.nbytes / 2**20
        del image
        base = {
            "checkpoint": str(checkpoint),
            "image_npy": str(workdir / "image.npy"),
            "image_tif": str(workdir / "image.tif"),
            "workdir": str(workdir),
            "device": args.device,
            "batches": [int(b) for b in args.batches.split(",")],
            "search_seconds": args.search_seconds,
            "threads": args.threads,
            "demo_size": args.demo_size,
            "pairs": args.pairs,
        }
        jobs = _jobs(args, precisions, main_precision, backends)
        results: dict[str, dict[str, Any]] = {}
        loads = [_load()]
        for _ in range(max(1, args.repeat)):
            for name, spec in jobs:
                skip = _skip_reason(spec["row"])
                if skip:
                    results[name] = {"skipped": skip}
                    continue
                labels = workdir / f"labels-{name.replace(' ', '-')}.npy"
                ceiling_best = _best_ceiling(results, spec["precision"])
                paired = {"ceiling_config": ceiling_best} if spec["row"] in ("engine", "http") and ceiling_best else {}
                result = _run_row({**base, **spec, **paired, "labels_out": str(labels)})
                if labels.is_file():
                    result["labels"] = str(labels)
                previous = results.get(name)
                if previous is None or result.get("seconds", 1e99) < previous.get("seconds", 1e99):
                    if previous and "peak_rss_mb" in previous:
                        result["peak_rss_mb"] = max(result.get("peak_rss_mb", 0), previous["peak_rss_mb"])
                    results[name] = result
            loads.append(_load())
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {device}",
            "load": loads,
            "size": args.size,
            "input_mb": input_mb,
            "labels_mb": args.size * args.size / 2**20,
            "checkpoint": str(checkpoint),
            "checkpoint_note": note,
            "main_precision": main_precision,
            "rows": results,
        }
        _add_derived(report)
        for r in results.values():
            r.pop("labels", None)
        emit(render(report), report, args.json)
    return 0


def _best_ceiling(results: dict[str, dict[str, Any]], precision: str) -> dict[str, Any] | None:
    """The fastest bare network at ``precision`` over the backends measured so far (its config)."""
    ceilings = [r for n, r in results.items() if n.startswith(f"ceiling {precision} ") and "best" in r]
    if not ceilings:
        return None
    best: dict[str, Any] = min(ceilings, key=lambda r: r["seconds"])["best"]
    return best


def _fastest(rows: dict[str, dict[str, Any]], prefix: str) -> str | None:
    """The fastest row whose name starts with ``prefix`` (tile-size rows aside)."""
    names = [n for n, r in rows.items() if n.startswith(prefix) and "tile" not in n and "mpx_per_s" in r]
    return max(names, key=lambda n: rows[n]["mpx_per_s"]) if names else None


def _reference(rows: dict[str, dict[str, Any]], ref: str, precision: str) -> str | None:
    """The row a ratio divides by: ``ceiling`` is the fastest backend's at ``precision``, ``ceiling
    torch`` that backend's, a baseline its own row at ``precision`` (else at any)."""
    kind, _, backend = ref.partition(" ")
    if backend:
        name = f"{kind} {precision} {backend}"
        return name if "mpx_per_s" in rows.get(name, {}) else None
    if kind == "ceiling":
        return _fastest(rows, f"ceiling {precision} ")
    return _fastest(rows, f"{kind} {precision}") or _fastest(rows, f"{kind} ")


def _add_derived(report: dict[str, Any]) -> None:
    """Mpx/s, RSS beyond the arrays, label agreement with the engine, and the ratios."""
    mpx = report["size"] ** 2 / 1e6
    rows = report["rows"]
    arrays = report["input_mb"] + report["labels_mb"]
    for r in rows.values():
        if "seconds" in r:
            r["mpx_per_s"] = mpx / r["seconds"]
        if "peak_rss_mb" in r:
            r["rss_beyond_arrays_mb"] = r["peak_rss_mb"] - arrays
    reference_name = next(
        (n for n in ("engine fp32 torch", "engine fp32 openvino") if "labels" in rows.get(n, {})), None
    )
    if reference_name is not None:
        reference = np.load(rows[reference_name]["labels"])
        for r in rows.values():
            if "labels" in r:
                r["agrees_with_engine_fp32"] = float((np.load(r["labels"]) == reference).mean())
    report["reference"] = reference_name
    ratios = {}
    for label, (row, ref, target) in TARGETS.items():
        row_kind, _, row_backend = row.partition(" ")
        for name, r in rows.items():
            parts = name.split()
            if parts[0] != row_kind or "tile" in name or "mpx_per_s" not in r:
                continue
            if row_backend and (len(parts) < 3 or parts[2] != row_backend):
                continue
            precision = parts[1]
            ref_name = _reference(rows, ref, precision)
            if ref_name is not None:
                value = r["mpx_per_s"] / rows[ref_name]["mpx_per_s"]
                ratios[f"{name} / {ref_name}"] = {
                    "value": value,
                    "target": target,
                    "met": value >= target,
                    "goal": label,
                }
    for name, r in rows.items():
        if "paired_ceiling_seconds" in r:
            value = r["paired_ceiling_seconds"] / r["seconds"]
            row = name.split()[0]
            goal = next(g for g, (rw, ref, _) in TARGETS.items() if rw == row and ref == "ceiling")
            target = TARGETS[goal][2]
            where = "in one process" if row == "engine" else "alternating with its requests"
            ratios[f"{name} / best ceiling, paired {where}"] = {
                "value": value,
                "target": target,
                "met": value >= target,
                "goal": goal,
            }
    report["ratios"] = ratios


def render(report: dict[str, Any]) -> str:
    """The results as a Markdown table plus ratio and agreement lines."""
    lines = [
        f"unet-tile bench, {report['date']}: {report['machine']}; load avg before/after rounds {report['load']}",
        f"image {report['size']}x{report['size']} uint16 ({report['input_mb']:.0f} MiB in, "
        f"{report['labels_mb']:.0f} MiB labels out); checkpoint {Path(report['checkpoint']).name}",
    ]
    if report["checkpoint_note"]:
        lines.append(f"NOTE: {report['checkpoint_note']}")
    lines += [
        "",
        "| row | backend | precision | Mpx/s | seconds | peak RSS MiB | RSS - arrays MiB | labels = engine fp32 "
        "| configuration |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in report["rows"].items():
        if name == "agreement":
            continue
        if "skipped" in r or "error" in r:
            lines.append(
                f"| {name} | | | | | | | | {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']} |"
            )
            continue
        agree = r.get("agrees_with_engine_fp32")
        lines.append(
            f"| {name} | {r.get('backend', 'torch')} | {r.get('precision', '')} | {r['mpx_per_s']:.2f} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['rss_beyond_arrays_mb']:.0f} | {'' if agree is None else f'{agree:.4%}'} | {r.get('config', '')} |"
        )
    if report["ratios"]:
        lines += ["", "ratios (output Mpx/s, same run):"]
        for name, q in report["ratios"].items():
            lines.append(f"- {name}: {q['value']:.2f}x (target >= {q['target']}x: {'met' if q['met'] else 'NOT met'})")
    agreement = report["rows"].get("agreement", {})
    if "agreement" in agreement:
        for p, v in agreement["agreement"].items():
            lines.append(
                f"- label agreement {p} vs eager fp32 on {agreement['pixels'] / 1e6:.1f} Mpx of held-out demo images: "
                f"{v:.4%} (worst image {agreement['worst_image'][p]:.4%})"
            )
    elif "error" in agreement:
        lines.append(f"- agreement row failed: {agreement['error']}")
    return "\n".join(lines)
