"""One benchmark row per process: ``python -m bench.rows '<json spec>'`` prints one JSON line.

Each row runs in a fresh process so its peak RSS (``ru_maxrss``) is its own. What is
timed (``seconds``) and what is not:

* ``ceiling``: forward passes of the bare network (logits only) on random 572x572 batches,
  searching batch size x layout (NCHW / channels-last) x module (as loaded / batch norm
  folded); the best per-tile time is scaled to the number of tiles the engine's plan
  needs for this image. Input windows, normalization and stitching are not included:
  that is what makes it the ceiling.
* ``engine``: ``tiling.segment`` from the decoded array to stitched labels (normalization
  fitted beforehand, one warm-up tile beforehand, neither timed).
* ``cli``: the whole ``unet-tile segment in.tif -o out.tif`` command, interpreter start and
  model load included.
* ``http``: one POST of the TIFF to a live, warmed-up ``unet-tile serve`` on 127.0.0.1,
  until the whole response (the mask TIFF) is received. RSS is the server's peak. Given
  the ceiling's best configuration, requests alternate with the bare model's passes in
  this (client) process while the server idles, best of ``pairs`` each.
* ``naive`` / ``monai``: :mod:`bench.baselines` from the decoded array (normalization
  included, model construction not).
* ``agreement``: labels of each backend and precision against eager fp32 on the held-out demo
  images.

``ceiling`` and ``engine`` rows run per backend (``torch``: eager PyTorch; ``openvino``: the
network compiled by OpenVINO's CPU plugin, its conversion cached and not timed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile
import torch

import tiling
import unet
from unet.checkpoint import Checkpoint

from . import baselines, data
from .agreement import label_agreement
from .serving import running_server

__all__ = ["ROWS", "main", "run_row"]

Spec = dict[str, Any]
Result = dict[str, Any]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(spec: Spec) -> tuple[Checkpoint, npt.NDArray[Any]]:
    ck = unet.load_checkpoint(spec["checkpoint"])
    image = np.load(spec["image_npy"])
    return ck, image


def _plan(ck: Checkpoint, image: npt.NDArray[Any], tile_size: int = 388) -> tiling.TilePlan:
    return tiling.plan_tiles(image.shape[-2:], depth=ck.config.depth, tile_size=tile_size)


def _save_labels(spec: Spec, labels: npt.NDArray[Any]) -> None:
    if spec.get("labels_out"):
        np.save(spec["labels_out"], labels)


def _time_passes(run: Callable[[], object], device: torch.device, min_passes: int, min_seconds: float) -> float:
    """Seconds per pass: at least ``min_passes`` and ``min_seconds``, after one warm-up."""
    run()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_passes or time.perf_counter() - t0 < min_seconds:
        run()
        n += 1
    _sync(device)
    return (time.perf_counter() - t0) / n


def _bare_models(ck: Checkpoint, precision: str) -> tuple[dict[str, torch.nn.Module], torch.dtype | None]:
    """The ceiling's candidate modules (as loaded, batch norm folded) and its autocast dtype."""
    modules = {"as-loaded": ck.model.eval(), "bn-folded": tiling.predictor.fold_batch_norm(ck.model)}
    return modules, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


_OPENVINO: dict[tuple[str, str, str], Any] = {}  # (checkpoint sha256, precision, device) -> predictor


def _openvino_predictor(ck: Checkpoint, precision: str, device: str = "cpu") -> Any:
    """One OpenVINO predictor per checkpoint and precision in this row's process: the paired
    ceiling and the engine share it instead of compiling the network again at every pair."""
    from service.paths import cache_dir  # noqa: PLC0415
    from service.segmenter import calibration_windows  # noqa: PLC0415

    key = (ck.sha256, precision, device)
    if key not in _OPENVINO:
        _OPENVINO[key] = tiling.build_predictor(
            ck.model,
            backend="openvino",
            device=device,
            precision=precision,
            cache_dir=cache_dir(),
            calibration=lambda: calibration_windows(ck),
        )
    return _OPENVINO[key]


def _openvino_ceiling_seconds(compiled: Any, ck: Checkpoint, batch: int, plan: tiling.TilePlan) -> float:
    """The compiled network alone (one infer request, random input) for as many tiles as ``plan``."""
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, ck.config.in_channels, *plan.tile_in), np.float32)
    passes = max(1, -(-len(plan) // batch))
    request.infer({0: x})
    t0 = time.perf_counter()
    for _ in range(passes):
        request.infer({0: x})
    return (time.perf_counter() - t0) / (passes * batch) * len(plan)


def _ceiling_openvino(spec: Spec) -> Result:
    ck, image = _load(spec)
    plan = _plan(ck, image)
    predictor = _openvino_predictor(ck, spec["precision"])
    compiled = predictor._compiled
    results = []
    for batch in spec["batches"]:
        request = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal((batch, ck.config.in_channels, *plan.tile_in), np.float32)

        def run(r: Any = request, x: npt.NDArray[np.float32] = x) -> object:
            return r.infer({0: x})

        per_pass = _time_passes(run, torch.device("cpu"), 2, spec["search_seconds"])
        results.append({"batch": batch, "s_per_tile": per_pass / batch})
    best = min(results, key=lambda r: r["s_per_tile"])
    return {
        "seconds": _openvino_ceiling_seconds(compiled, ck, int(best["batch"]), plan),
        "precision": predictor.precision,
        "backend": "openvino",
        "config": f"OpenVINO CPU, batch {best['batch']}",
        "best": {"backend": "openvino", "batch": best["batch"], "precision": predictor.precision},
        "tiles": len(plan),
        "search": results,
    }


def ceiling(spec: Spec) -> Result:
    if spec.get("backend") == "openvino":
        return _ceiling_openvino(spec)
    tiling.predictor.keep_freed_memory()  # what the engine's predictor does: the ceiling gets it too
    ck, image = _load(spec)
    device = tiling.resolve_device(spec["device"])
    precision = tiling.resolve_precision(spec["precision"], device)
    plan = _plan(ck, image)
    modules, dtype = _bare_models(ck, precision)
    h, w = plan.tile_in
    results = []
    for (name, module), layout, batch in (
        (m, layout, b) for m in modules.items() for layout in ("nchw", "channels_last") for b in spec["batches"]
    ):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        net = module.to(device).to(memory_format=fmt)  # type: ignore[call-overload]
        x = torch.randn(batch, ck.config.in_channels, h, w, device=device).contiguous(memory_format=fmt)

        def run(net: torch.nn.Module = net, x: torch.Tensor = x) -> object:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
                return net(x)

        try:
            per_pass = _time_passes(run, device, min_passes=2, min_seconds=spec["search_seconds"])
        except torch.cuda.OutOfMemoryError:
            continue
        results.append({"module": name, "layout": layout, "batch": batch, "s_per_tile": per_pass / batch})
    best = min(results, key=lambda r: r["s_per_tile"])
    config = {"backend": "torch", **{k: best[k] for k in ("module", "layout", "batch")}}
    seconds = _ceiling_seconds(ck, modules, config, plan, device, dtype)
    return {
        "seconds": seconds,
        "precision": precision,
        "backend": "torch",
        "config": f"eager {best['module']}, {best['layout']}, batch {best['batch']}",
        "best": config,
        "tiles": len(plan),
        "search": results,
    }


def _ceiling_seconds(
    ck: Checkpoint,
    modules: dict[str, torch.nn.Module],
    config: dict[str, Any],
    plan: tiling.TilePlan,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """Bare-model seconds for as many tiles as ``plan`` has, in ``config``'s batches."""
    if config.get("backend") == "openvino":
        compiled = _openvino_predictor(ck, config["precision"])._compiled
        return _openvino_ceiling_seconds(compiled, ck, int(config["batch"]), plan)
    fmt = torch.channels_last if config["layout"] == "channels_last" else torch.contiguous_format
    net = modules[config["module"]].to(device).to(memory_format=fmt)  # type: ignore[call-overload]
    batch = int(config["batch"])
    x = torch.randn(batch, ck.config.in_channels, *plan.tile_in, device=device).contiguous(memory_format=fmt)
    passes = max(1, -(-len(plan) // batch))
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
        net(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(passes):
            net(x)
        _sync(device)
        per_tile = (time.perf_counter() - t0) / (passes * batch)
    return per_tile * len(plan)


def _predictor(ck: Checkpoint, spec: Spec) -> Any:
    if spec.get("backend") == "openvino":
        return _openvino_predictor(ck, spec["precision"], spec["device"])
    return tiling.TorchPredictor(ck.model, device=spec["device"], precision=spec["precision"])


def engine(spec: Spec) -> Result:
    ck, image = _load(spec)
    predictor = _predictor(ck, spec)
    affine = ck.normalization.fit(image[None])
    tile_size = spec.get("tile_size", 388)
    plan = _plan(ck, image, tile_size)
    batch = spec.get("batch_size") or predictor.preferred_batch_size(plan.tile_in)
    predictor.predict_labels(np.zeros((1, ck.config.in_channels, *plan.tile_in), np.float32))  # warm-up
    paired = spec.get("ceiling_config") if tile_size == 388 else None
    modules, dtype = _bare_models(ck, predictor.precision) if predictor.precision != "int8" else ({}, None)
    seconds, ceiling_s = float("inf"), float("inf")
    for _ in range(int(spec.get("pairs", 1))):  # engine and bare model alternately: same load for both
        t0 = time.perf_counter()
        labels = tiling.segment(image, predictor, normalize=affine, tile_size=tile_size, batch_size=batch)
        seconds = min(seconds, time.perf_counter() - t0)
        if paired:
            ceiling_s = min(ceiling_s, _ceiling_seconds(ck, modules, paired, plan, predictor.device, dtype))
    _save_labels(spec, labels)
    result = {
        "seconds": seconds,
        "precision": predictor.precision,
        "backend": predictor.backend,
        "config": f"tile {tile_size}, batch {batch}",
        "tiles": len(plan),
    }
    if paired:
        result["paired_ceiling_seconds"] = ceiling_s
    return result


def _unet_tile() -> list[str]:
    return [sys.executable, "-m", "service.cli"]


def cli(spec: Spec) -> Result:
    out = Path(spec["workdir"]) / "cli-out.tif"
    cmd = [*_unet_tile(), "segment", spec["image_tif"], "-o", str(out), "--checkpoint", spec["checkpoint"]]
    cmd += [
        "--precision",
        spec["precision"],
        "--device",
        spec["device"],
        "--backend",
        spec.get("backend", "auto"),
        "-q",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"unet-tile segment failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    labels = tifffile.imread(out)
    _save_labels(spec, labels)
    out.unlink()
    return {
        "seconds": seconds,
        "precision": spec["precision"],
        "backend": spec.get("backend", "auto"),
        "config": "unet-tile segment (process start, model load, TIFF read and write)",
        "peak_rss_mb": _children_peak_rss_mb(),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def _server(spec: Spec) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    cmd = [*_unet_tile(), "serve", "--host", "127.0.0.1", "--port", str(port), "--checkpoint", spec["checkpoint"]]
    cmd += ["--precision", spec["precision"], "--device", spec["device"], "--log-level", "warning"]
    cmd += ["--backend", spec.get("backend", "auto")]
    env = {**os.environ, "UNET_JOBS_DIR": str(Path(spec["workdir"]) / "jobs")}  # not the user's jobs directory
    with running_server(cmd, port, Path(spec["workdir"]) / "server.log", env=env) as served:
        yield served


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """POST ``body`` to ``url``/segment as curl does: one ``sendall`` of the body.

    Not httpx: it sends a bytes body in small chunks, ~15x slower than curl for a 275 MiB
    upload here (6.7 s against 0.45 s), which would bill the client's cost to the server.
    """
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=3600)
    try:
        conn.request("POST", "/segment", body=body, headers=headers)
        response = conn.getresponse()
        content = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST /segment answered {response.status}: {content[:500]!r}")
        return content, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def http(spec: Spec) -> Result:
    body = Path(spec["image_tif"]).read_bytes()
    small = Path(spec["workdir"]) / "warmup.tif"
    tifffile.imwrite(small, np.load(spec["image_npy"], mmap_mode="r")[:600, :600])
    headers = {"content-type": "image/tiff"}
    paired = spec.get("ceiling_config")
    ceiling_s = float("inf")
    if paired:  # the bare model in this (client) process, between requests, while the server idles
        tiling.predictor.keep_freed_memory()
        ck, image = _load(spec)
        plan = _plan(ck, image)
        device = tiling.resolve_device(spec["device"])
        modules, dtype = _bare_models(ck, tiling.resolve_precision(spec["precision"], device, "openvino"))
        del image
    with _server(spec) as (url, proc):
        _post(url, small.read_bytes(), headers)
        seconds = float("inf")
        for _ in range(int(spec.get("pairs", 1)) if paired else 1):
            t0 = time.perf_counter()
            content, response_headers = _post(url, body, headers)
            seconds = min(seconds, time.perf_counter() - t0)
            if paired:
                ceiling_s = min(ceiling_s, _ceiling_seconds(ck, modules, paired, plan, device, dtype))
        rss = _vm_hwm_mb(proc.pid)
    labels = tifffile.imread(io.BytesIO(content))
    _save_labels(spec, labels)
    return {
        "seconds": seconds,
        "precision": spec["precision"],
        "backend": spec.get("backend", "auto"),
        "config": "POST /segment (raw body), server defaults",
        "peak_rss_mb": rss,
        "server_timing": response_headers.get("server-timing", ""),
        **({"paired_ceiling_seconds": ceiling_s} if paired else {}),
    }


def naive(spec: Spec) -> Result:
    ck, image = _load(spec)
    affine = ck.normalization.fit(image[None])
    device = str(tiling.resolve_device(spec["device"]))
    t0 = time.perf_counter()
    labels = baselines.naive_segment(image, ck.model, affine, margin=ck.model.margin, device=device)
    seconds = time.perf_counter() - t0
    _save_labels(spec, labels)
    return {"seconds": seconds, "precision": "fp32", "config": "1 tile/pass, NCHW, np.pad, stride 388"}


def monai(spec: Spec) -> Result:
    if not baselines.monai_available():
        return {"skipped": "MONAI is not installed (pip install -e '.[bench]')"}
    ck, image = _load(spec)
    affine = ck.normalization.fit(image[None])
    device = tiling.resolve_device(spec["device"])
    precision = tiling.resolve_precision(spec["precision"], device)
    t0 = time.perf_counter()
    labels = baselines.monai_segment(
        image, ck.config.base_width, affine, num_classes=ck.config.num_classes, device=str(device), precision=precision
    )
    seconds = time.perf_counter() - t0
    _save_labels(spec, labels)
    return {
        "seconds": seconds,
        "precision": precision,
        "config": f"BasicUNet width {ck.config.base_width}, roi 572, overlap 0.25, gaussian, sw_batch 4",
    }


def agreement(spec: Spec) -> Result:
    """Labels of each backend x precision against eager fp32, through the engine, on the held-out demo images."""
    ck = unet.load_checkpoint(spec["checkpoint"])
    device = tiling.resolve_device(spec["device"])
    modes = [("torch", "bf16")] + ([("torch", "fp16")] if device.type == "cuda" else [])
    for backend in spec.get("backends", ["torch"]):
        if backend == "openvino":
            modes += [("openvino", p) for p in spec.get("openvino_precisions", ["fp32", "bf16"])]
    reference = tiling.TorchPredictor(ck.model, device=device, precision="fp32")
    named = {f"{b} {p}": _predictor(ck, {"backend": b, "precision": p, "device": str(device)}) for b, p in modes}
    return label_agreement(ck, data.demo_samples(spec.get("demo_size", 1024)), reference, named)


ROWS: dict[str, Callable[[Spec], Result]] = {
    "ceiling": ceiling,
    "engine": engine,
    "cli": cli,
    "http": http,
    "naive": naive,
    "monai": monai,
    "agreement": agreement,
}


def run_row(spec: Spec) -> Result:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result = ROWS[spec["row"]](spec)
    result.setdefault("peak_rss_mb", _peak_rss_mb())
    return result


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    print(json.dumps(run_row(spec)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
