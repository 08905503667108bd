"""Background jobs beside interactive requests, on one live server: ``python -m bench.jobs``.

In one run, against one warmed-up ``unet-tile serve`` on 127.0.0.1:

1. ``/segment`` of a small image, alone: latency (median of ``--requests``);
2. a ``/jobs`` job of a large image, alone: the job's own time (``started`` -> ``finished``);
3. the same job while a client posts the small image to ``/segment`` back to back: the job's
   time and the requests' latency;

then the ratios of 3. against 1. and 2., measured minutes apart in the same run. The job
time excludes the upload (the server records when the worker takes the job).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import tifffile

from . import data
from .rows import _post, _server
from .run import _cpu_name, emit

__all__ = ["main"]


def _submit(url: str, body: bytes) -> str:
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=3600)
    try:
        conn.request("POST", "/jobs", body=body, headers={"content-type": "image/tiff"})
        response = conn.getresponse()
        content = response.read()
        if response.status != 202:
            raise RuntimeError(f"POST /jobs answered {response.status}: {content[:500]!r}")
        return str(json.loads(content)["id"])
    finally:
        conn.close()


def _job_seconds(url: str, body: bytes) -> float:
    """Submit, wait for the end, and return the server's started -> finished time.

    Polls every 0.1 s on one kept-alive connection: cheap, as a remote client's polls are
    (a new httpx client per poll took a good part of a core on this 2-core machine).
    """
    job_id = _submit(url, body)
    parts = urllib.parse.urlsplit(url)
    conn = HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    try:
        while True:
            conn.request("GET", f"/jobs/{job_id}")
            record = json.loads(conn.getresponse().read())
            if record["state"] == "done":
                return float(record["finished"] - record["started"])
            if record["state"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {record['state']}: {record['error']}")
            time.sleep(0.1)
    finally:
        conn.close()


def _latency(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    _post(url, body, {"content-type": "image/tiff"})
    return time.perf_counter() - t0


def _job_under_load(url: str, big: bytes, small: bytes) -> tuple[float, list[float]]:
    """The job's time while one client keeps ``/segment`` busy, and that client's latencies."""
    latencies: list[float] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            latencies.append(_latency(url, small))

    thread = threading.Thread(target=client, name="segment-client")
    thread.start()
    try:
        seconds = _job_seconds(url, big)
    finally:
        stop.set()
        thread.join()
    return seconds, latencies


def run(
    checkpoint: Path, workdir: Path, *, size: int, small: int, rounds: int, requests: int, precision: str, device: str
) -> dict[str, Any]:
    big_tif, small_tif = workdir / "job.tif", workdir / "request.tif"
    tifffile.imwrite(big_tif, data.bench_image(size), tile=(256, 256))
    tifffile.imwrite(small_tif, data.bench_image(small, seed=8))
    big, body = big_tif.read_bytes(), small_tif.read_bytes()
    spec = {"checkpoint": str(checkpoint), "precision": precision, "device": device, "workdir": str(workdir)}
    alone_job: list[float] = []
    alone_request: list[float] = []
    loaded_job: list[float] = []
    loaded_request: list[float] = []
    with _server(spec) as (url, _):
        _latency(url, body)  # warm-up
        for _ in range(rounds):
            alone_request += [_latency(url, body) for _ in range(requests)]
            alone_job.append(_job_seconds(url, big))
            seconds, latencies = _job_under_load(url, big, body)
            loaded_job.append(seconds)
            loaded_request += latencies
    job_mpx, request_mpx = size * size / 1e6, small * small / 1e6
    job_alone, job_loaded = statistics.median(alone_job), statistics.median(loaded_job)
    request_alone, request_loaded = statistics.median(alone_request), statistics.median(loaded_request)
    served = len(loaded_request) / rounds  # requests answered per loaded job (about)
    return {
        "job_mpx": job_mpx,
        "request_mpx": request_mpx,
        "job_alone_s": alone_job,
        "job_loaded_s": loaded_job,
        "request_alone_s": request_alone,
        "request_loaded_s": request_loaded,
        "request_loaded_max_s": max(loaded_request),
        "requests_per_loaded_job": served,
        "ratios": {
            "job under load / job alone (time)": job_loaded / job_alone,
            "request during a job / request alone (latency)": request_loaded / request_alone,
            "both together / job alone (Mpx/s)": ((job_mpx + served * request_mpx) / job_loaded)
            / (job_mpx / job_alone),
        },
    }


def render(report: dict[str, Any]) -> str:
    r = report["result"]
    seconds = ", ".join(f"{s:.2f}" for s in r["job_alone_s"])
    loaded = ", ".join(f"{s:.2f}" for s in r["job_loaded_s"])
    lines = [
        f"unet-tile bench.jobs, {report['date']}: {report['machine']}; precision {report['precision']}",
        f"job: {report['size']}x{report['size']} uint16; requests: {report['small']}x{report['small']}; "
        f"checkpoint {Path(report['checkpoint']).name}",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| job alone, s (each round) | {seconds} |",
        f"| job while /segment is kept busy, s | {loaded} |",
        f"| /segment latency alone, median s | {r['request_alone_s']:.3f} |",
        f"| /segment latency during a job, median (max) s | {r['request_loaded_s']:.3f} ({r['request_loaded_max_s']:.3f}) |",
        f"| requests answered per loaded job | {r['requests_per_loaded_job']:.1f} |",
        "",
        *(f"- {name}: {value:.2f}x" for name, value in r["ratios"].items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=3072, help="side of the job's uint16 image (default 3072)")
    p.add_argument("--small", type=int, default=768, help="side of the /segment requests' image (default 768)")
    p.add_argument("--rounds", type=int, default=3, help="alone/under-load rounds (default 3)")
    p.add_argument("--requests", type=int, default=5, help="lone /segment requests per round (default 5)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the demo checkpoint")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="unet-bench-jobs-") as tmp:
        checkpoint, _ = data.resolve_checkpoint(args.checkpoint, Path(tmp))
        result = run(
            checkpoint,
            Path(tmp),
            size=args.size,
            small=args.small,
            rounds=args.rounds,
            requests=args.requests,
            precision=args.precision,
            device=args.device,
        )
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "precision": args.precision,
        "size": args.size,
        "small": args.small,
        "checkpoint": str(checkpoint),
        "result": result,
    }
    emit(render(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
