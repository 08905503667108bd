"""One image on a local Dask cluster of 1 and of 2 workers, against one machine: ``python -m bench.dask``.

    python -m bench.dask                          # 2048x2048 uint8, blocks of 768, demo checkpoint, fp32
    python -m bench.dask --size 4096 --block 1536 --repeat 2
    python -m bench.dask --json dask.json         # the results as JSON too

In one run: the single-machine path (:func:`service.pipeline.segment_file`, torch limited to
1 thread), then :func:`service.cluster.segment_on_cluster` on a ``LocalCluster`` of 1 and of 2
worker processes (one thread each; Dask starts workers with ``OMP_NUM_THREADS=1``, so each
worker's torch runs on 1 thread: the baseline is held to 1 thread too, for a like-for-like
comparison). Each configuration runs ``--repeat`` times; the first run includes loading the
model (on the workers: the ``ModelPlugin``), the table keeps the fastest. Every output TIFF
is compared with the single-machine labels.

Also measured: the scheduler's cost per task (``--noop`` trivial tasks submitted one by one,
``pure=False``, then gathered), the workers' busy time from Dask's task stream against the
client's wall time, each worker's peak RSS, the client's TIFF assembly (the labels written
block by block through the sink a cluster run's client uses) and the client's normalization
fit (its one read of the input). Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile
import torch
from distributed import Client, LocalCluster, get_task_stream

from service.cluster import block_for, segment_on_cluster
from service.errors import InputError
from service.io import ImageHeader
from service.paths import default_checkpoint
from service.pipeline import segment_file
from service.segmenter import Segmenter
from service.sinks import TiledTiffSink
from service.sources import TiffSource
from tiling import plan_tiles
from tiling.blocks import block_plan, plan_blocks
from unet import load_checkpoint, synth

from .run import _cpu_name, _load, emit

__all__ = ["main", "render"]

_SAMPLE_SIDE = 1024  # the synthetic image is one demo-like sample of this side, tiled (seconds, not minutes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.dask", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="side of the synthetic uint8 image (default 2048)")
    p.add_argument("--block", type=int, default=768, help="block side, a multiple of the tile stride (default 768)")
    p.add_argument("--workers", default="1,2", help="comma list of local cluster sizes, 1 included (default 1,2)")
    p.add_argument(
        "--repeat", type=int, default=3, help="runs per configuration, the first with model load (default 3)"
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="default fp32 (exact tiling)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the bundled demo checkpoint")
    p.add_argument("--noop", type=int, default=500, help="trivial tasks for the scheduler-overhead figure")
    p.add_argument("--assembly-size", type=int, default=8192, help="label image side for the client-assembly figure")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def _image(size: int, seed: int = 7) -> npt.NDArray[np.uint8]:
    """A (size, size) uint8 fluorescence-like image: one :func:`unet.synth.synth_image` sample, tiled."""
    side = min(size, _SAMPLE_SIDE)
    sample = synth.synth_image(np.random.default_rng(seed), (side, side), dtype="uint8").image
    reps = -(-size // side)
    return np.ascontiguousarray(np.tile(sample, (reps, reps))[:size, :size])


def _noop(i: int) -> int:
    return i


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _read_bytes() -> int:
    """Bytes this process has read through read()/pread() (files, not sockets): /proc/self/io rchar."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _worker_env() -> dict[str, Any]:
    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    seconds = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


def _baseline(checkpoint: Path, src: Path, dst: Path, precision: str, repeat: int) -> dict[str, Any]:
    """The single-machine path on 1 torch thread; the first run includes loading the model."""
    torch.set_num_threads(1)
    segmenters: list[Segmenter] = []

    def run() -> None:
        if not segmenters:
            segmenters.append(Segmenter(load_checkpoint(checkpoint), device="cpu", precision=precision))
        segment_file(segmenters[0], src, dst)

    seconds, cpu = [], []
    for _ in range(max(1, repeat)):
        t, c = time.perf_counter(), time.process_time()
        run()
        seconds.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    best = int(np.argmin(seconds))
    return {"seconds": seconds, "cpu_share": cpu[best] / seconds[best], "torch_threads": torch.get_num_threads()}


def _scheduler_overhead(client: Client, n: int) -> float:
    """Milliseconds per trivial task, submitted one by one (as a cluster run submits) and gathered."""
    client.gather([client.submit(_noop, i, pure=False) for i in range(min(n, 50))])  # warm the path
    t0 = time.perf_counter()
    client.gather([client.submit(_noop, i, pure=False) for i in range(n)])
    return (time.perf_counter() - t0) / n * 1e3


def _busy(stream: list[dict[str, Any]]) -> tuple[int, float]:
    """(block tasks, their summed compute seconds on the workers) from a task stream."""
    tasks = [t for t in stream if str(t.get("key", "")).startswith("unet-block-")]
    compute = sum(s["stop"] - s["start"] for t in tasks for s in t["startstops"] if s["action"] == "compute")
    return len(tasks), compute


def _on_cluster(workers: int, checkpoint: Path, src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        client.wait_for_workers(workers)
        start_s = time.perf_counter() - t0
        seconds, busy, reads, cpu, client_cpu = [], [], [], [], []
        for _ in range(max(1, args.repeat)):
            before, cpu_before = client.run(_read_bytes), client.run(time.process_time)
            with get_task_stream(client) as ts:
                t, c = time.perf_counter(), time.process_time()
                segment_on_cluster(
                    client, checkpoint, src, dst, block=args.block, device="cpu", precision=args.precision
                )
                seconds.append(time.perf_counter() - t)
                client_cpu.append(time.process_time() - c)
            busy.append(_busy(ts.data))
            after, cpu_after = client.run(_read_bytes), client.run(time.process_time)
            reads.append(sum(after[w] - before[w] for w in after if w in before))
            cpu.append(sum(cpu_after[w] - cpu_before[w] for w in cpu_after if w in cpu_before))
        overhead_ms = _scheduler_overhead(client, args.noop)
        env = list(client.run(_worker_env).values())
        rss = list(client.run(_peak_rss_mib).values())
    best = int(np.argmin(seconds))
    tasks, compute = busy[best]
    return {
        "workers": workers,
        "start_s": start_s,
        "seconds": seconds,
        "tasks": tasks,
        "compute_s": compute,
        "cpu_s": cpu[best],
        "client_cpu_s": client_cpu[best],  # this process: the client and the LocalCluster's scheduler
        "read_mb": reads[-1] / 1e6,  # the last run: model and imports long loaded
        "noop_ms_per_task": overhead_ms,
        "worker_torch_threads": sorted({e["torch_threads"] for e in env}),
        "worker_omp": sorted({str(e["OMP_NUM_THREADS"]) for e in env}),
        "worker_peak_rss_mib": max(rss),
    }


def _balance_bound(tiles: list[int], workers: int) -> float:
    """The speed-up ``workers`` can reach with these blocks (greedy, longest first; cost = tiles)."""
    loads = [0] * workers
    for n in sorted(tiles, reverse=True):
        loads[loads.index(min(loads))] += n
    return sum(tiles) / max(loads)


def _assembly(labels: npt.NDArray[np.uint8], side: int, block: int, depth: int, workdir: Path) -> dict[str, float]:
    """The client's TIFF assembly: a ``side`` x ``side`` label image (``labels`` tiled) handed to
    the cluster run's sink block by block, compressed and written; best of 2."""
    big = np.tile(labels, (-(-side // labels.shape[0]), -(-side // labels.shape[1])))[:side, :side]
    grid = plan_blocks(plan_tiles(big.shape, depth=depth), block)
    header = ImageHeader(big.shape, "YX", np.dtype(np.uint8), None, None, None)
    target = workdir / "assembly.tif"

    def run() -> None:
        sink = TiledTiffSink(target, header)
        blocks = sink.plane(0, grid)
        for b in grid.tiles:
            blocks.add(b, big[b.dest])
        blocks.finish()
        sink.finish()

    seconds = min(_timed(run, 2))
    return {
        "side": side,
        "seconds": seconds,
        "mb_per_s": big.nbytes / 1e6 / seconds,
        "file_mb": target.stat().st_size / 1e6,
    }


def _fit(checkpoint: Path, src: Path) -> dict[str, float]:
    """The client's normalization fit on the windowed input (its read of the image)."""
    normalization = load_checkpoint(checkpoint).normalization
    with contextlib.closing(TiffSource(src)) as source:
        source.windowed()
        t0 = time.perf_counter()
        normalization.fit(source.plane(0))
        seconds = time.perf_counter() - t0
        mb = source.header.pixels * source.header.dtype.itemsize / 1e6
    return {"seconds": seconds, "mb_per_s": mb / seconds}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    checkpoint = (args.checkpoint or default_checkpoint()).resolve()
    depth = load_checkpoint(checkpoint).config.depth
    plan = plan_tiles((args.size, args.size), depth=depth)
    try:
        grid = plan_blocks(plan, block_for(plan, False, args.block))
    except InputError as e:
        raise SystemExit(f"--block: {e}") from None
    block_tiles = [len(block_plan(plan, b)) for b in grid.tiles]
    src = workdir / "image.tif"
    tifffile.imwrite(src, _image(args.size), tile=(256, 256))  # tiled, as large images usually are
    loads = [_load()]
    single = _baseline(checkpoint, src, workdir / "single.tif", args.precision, args.repeat)
    reference = tifffile.imread(workdir / "single.tif")
    clusters = []
    for n in args.worker_counts:
        dst = workdir / f"cluster-{n}.tif"
        result = _on_cluster(n, checkpoint, src, dst, args)
        result["identical"] = bool(np.array_equal(tifffile.imread(dst), reference))
        result["balance_bound"] = _balance_bound(block_tiles, n)
        clusters.append(result)
        loads.append(_load())
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.dask " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, cpu",
        "torch": torch.__version__,
        "load": loads,
        "size": args.size,
        "block": args.block,
        "blocks": len(grid),
        "tiles": len(plan),
        "tiles_per_block": sorted(set(block_tiles)),
        "precision": args.precision,
        "noop_tasks": args.noop,
        "checkpoint": str(checkpoint),
        "single": single,
        "clusters": clusters,
        "assembly": _assembly(reference, args.assembly_size, args.block, depth, workdir),
        "fit": _fit(checkpoint, src),
    }


def render(report: dict[str, Any]) -> str:
    """The results as a Markdown table plus the ratio, overhead and memory lines."""
    mpx = report["size"] ** 2 / 1e6
    single, clusters = report["single"], report["clusters"]
    one = min(clusters[0]["seconds"])
    lines = [
        f"unet-tile bench.dask, {report['date']}: {report['machine']}; torch {report['torch']}; "
        f"load avg before/after each part {report['load']}",
        f"image {report['size']}x{report['size']} uint8 ({mpx:.1f} Mpx), {report['tiles']} tiles; "
        f"blocks of {report['block']} px: {report['blocks']} tasks of {report['tiles_per_block']} tiles; "
        f"precision {report['precision']}, device cpu; checkpoint {Path(report['checkpoint']).name}",
        f"torch threads: single machine {single['torch_threads']} (torch.set_num_threads(1), for a fair "
        f"comparison); each Dask worker {clusters[0]['worker_torch_threads']} "
        f"(OMP_NUM_THREADS={clusters[0]['worker_omp']}, distributed's pre-spawn-environ)",
        "",
        "| workers | wall s (best) | first run s | Mpx/s | speed-up vs 1 worker | balance bound | worker busy % "
        "| worker CPU % | client CPU % | cluster start s | worker peak RSS MiB | labels = single machine |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| single machine (segment_file, 1 thread) | {min(single['seconds']):.2f} | {single['seconds'][0]:.2f} "
        f"| {mpx / min(single['seconds']):.2f} | {one / min(single['seconds']):.2f} | | | {single['cpu_share']:.0%} | | | "
        "| reference |",
    ]
    for c in clusters:
        best = min(c["seconds"])
        busy = c["compute_s"] / (best * c["workers"])
        lines.append(
            f"| {c['workers']} | {best:.2f} | {c['seconds'][0]:.2f} | {mpx / best:.2f} | {one / best:.2f} "
            f"| {c['balance_bound']:.2f} | {busy:.0%} | {c['cpu_s'] / (best * c['workers']):.0%} "
            f"| {c['client_cpu_s'] / best:.0%} | {c['start_s']:.1f} | {c['worker_peak_rss_mib']:.0f} "
            f"| {'yes' if c['identical'] else 'NO'} |"
        )
    two = clusters[-1]  # the largest cluster
    best2 = min(two["seconds"])
    idle = best2 * two["workers"] - two["compute_s"]
    assembly, fit = report["assembly"], report["fit"]
    lines += [
        "",
        "worker busy %: the block tasks' compute time (Dask's task stream) / (wall x workers); worker CPU %: the "
        "worker processes' CPU time / (wall x workers): busy near 100 % with CPU well below it means the workers "
        "waited for a core; client CPU %: this process's (client and scheduler) CPU time / wall; balance bound: "
        "the speed-up these blocks allow (cost = tiles).",
        "",
        f"identical: {'yes' if all(c['identical'] for c in clusters) else 'NO'}",
        f"- ratio {two['workers']} workers / 1 worker: {one / best2:.2f}x (Mpx/s, same run); 1 worker / single "
        f"machine: {min(single['seconds']) / one:.2f}x",
        f"- scheduler overhead: {two['noop_ms_per_task']:.2f} ms per no-op task on {two['workers']} worker(s) "
        f"({report['noop_tasks']} tasks submitted one by one, pure=False, then gathered"
        + "".join(f"; {c['workers']} worker(s): {c['noop_ms_per_task']:.2f} ms" for c in clusters[:-1])
        + ")",
        f"- real run, {two['workers']} worker(s): {two['tasks']} block tasks computed for {two['compute_s']:.2f} s in all on the "
        f"workers, {best2:.2f} s wall on the client: {idle:.2f} worker-s not computing "
        f"({idle / max(two['tasks'], 1) * 1e3:.0f} ms per task: client fit and assembly, transfers, the tail)",
        f"- worker file reads in the last run, {two['workers']} worker(s): {two['read_mb']:.1f} MB for a {mpx:.1f} MB uint8 input "
        f"({two['read_mb'] / mpx:.2f}x; /proc/self/io rchar; each tile reads its own window in whole TIFF tiles)",
        f"- client TIFF assembly: {assembly['side']}x{assembly['side']} uint8 labels block by block in "
        f"{assembly['seconds']:.2f} s = {assembly['mb_per_s']:.0f} MB/s of labels ({assembly['file_mb']:.2f} MB zlib file)",
        f"- client normalization fit (reads the input once): {fit['seconds']:.2f} s = {fit['mb_per_s']:.0f} MB/s "
        "of decoded input",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        args.worker_counts = sorted({int(n) for n in args.workers.split(",") if n.strip()})
    except ValueError:
        raise SystemExit(f"--workers: a comma list of integers, got {args.workers!r}") from None
    if 1 not in args.worker_counts or min(args.worker_counts) < 1:
        raise SystemExit(
            f"--workers must include 1 (the speed-up's reference) and no count below 1, got {args.workers!r}"
        )
    with tempfile.TemporaryDirectory(prefix="unet-bench-dask-") as tmp:
        report = run(args, Path(tmp))
    emit(render(report), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
