"""A tiny-image run of ``python -m bench.dask``: real local clusters of 1 and 2 workers.

Timings are never asserted (benchmarks are not tests): what is checked is that the bench
runs every configuration, that each cluster's output is the single machine's labels, and
that the report has its table, its ratio and its overhead figures. It runs in a subprocess:
the bench limits torch to one thread, which must not leak into the rest of the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dask_bench_runs_one_and_two_workers_and_matches_one_machine(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "dask.json"
    cmd = [sys.executable, "-m", "bench.dask", "--size", "400", "--block", "384", "--repeat", "1"]
    cmd += ["--noop", "20", "--assembly-size", "512", "--checkpoint", str(tiny_checkpoint), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table = proc.stdout
    assert "| workers | wall s (best) |" in table
    assert "| single machine (segment_file, 1 thread) |" in table
    assert "| 1 |" in table and "| 2 |" in table
    assert "identical: yes" in table
    assert "- ratio 2 workers / 1 worker: " in table
    assert "ms per no-op task on 2 worker(s)" in table

    report = json.loads(out.read_text())
    assert report["blocks"] == 4 and report["tiles"] == 4  # 400 px: 2 x 2 blocks of 384, one tile each
    assert report["single"]["torch_threads"] == 1
    clusters = report["clusters"]
    assert [c["workers"] for c in clusters] == [1, 2]
    for c in clusters:
        assert c["identical"] is True
        assert c["tasks"] == report["blocks"]  # one task per block, seen in the task stream
        assert c["compute_s"] > 0 and c["noop_ms_per_task"] > 0 and c["worker_peak_rss_mib"] > 0
    assert report["assembly"]["mb_per_s"] > 0 and report["fit"]["mb_per_s"] > 0


def test_dask_bench_refuses_a_block_off_the_stride_grid(tiny_checkpoint: Path) -> None:
    cmd = [sys.executable, "-m", "bench.dask", "--size", "400", "--block", "500", "--checkpoint", str(tiny_checkpoint)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "--block: a block side must be a multiple of 384" in proc.stderr
