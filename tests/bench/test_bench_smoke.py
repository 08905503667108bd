"""A tiny-image run of the whole bench: every row runs and the table holds sane values.

Timings are never asserted (benchmarks are not tests); what is checked is that each row
produced a positive throughput and a plausible peak RSS, that the CLI and HTTP rows give
exactly the engine's labels, and that the report has its ratios and agreement figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.baselines import monai_segment, naive_segment
from bench.run import TARGETS
from tiling.openvino import openvino_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_every_row_on_a_tiny_image(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Every row of every backend installed (torch, and OpenVINO where its extra is)."""
    backends = ["torch", "openvino"] if openvino_available() else ["torch"]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--size", "200", "--checkpoint", str(tiny_checkpoint)]
    cmd += ["--precisions", "fp32", "--rows", "ceiling,engine,cli,http,naive,agreement", "--pairs", "1"]
    cmd += ["--batches", "1,2", "--search-seconds", "0", "--demo-size", "64", "--json", str(out)]
    cmd += ["--backends", ",".join(backends)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]

    last = backends[-1]  # the CLI and HTTP rows run the last backend
    expected = {f"{row} fp32 {b}" for row in ("ceiling", "engine") for b in backends}
    expected |= {f"cli fp32 {last}", f"http fp32 {last}", "naive fp32", "agreement"}
    assert set(rows) == expected
    assert not [name for name, r in rows.items() if "error" in r], rows

    timed = {name: r for name, r in rows.items() if "seconds" in r}
    assert expected - {"agreement"} <= set(timed)
    for name, r in timed.items():
        assert r["seconds"] > 0 and r["mpx_per_s"] > 0, name
        assert r["mpx_per_s"] == pytest.approx(200 * 200 / 1e6 / r["seconds"]), name
        assert 30 < r["peak_rss_mb"] < 8192, (name, r["peak_rss_mb"])
    for b in backends:
        assert rows[f"ceiling fp32 {b}"]["tiles"] == rows[f"engine fp32 {b}"]["tiles"] == 1
        assert rows[f"ceiling fp32 {b}"]["config"].endswith(("batch 1", "batch 2"))
        assert rows[f"ceiling fp32 {b}"]["backend"] == rows[f"engine fp32 {b}"]["backend"] == b

    # the same engine behind the CLI and HTTP, and fp32 on any backend: the very same labels
    assert report["reference"] == "engine fp32 torch"
    for name in (*(f"engine fp32 {b}" for b in backends), f"cli fp32 {last}", f"http fp32 {last}"):
        assert rows[name]["agrees_with_engine_fp32"] == 1.0, name
    assert rows["naive fp32"]["agrees_with_engine_fp32"] > 0.99  # same weights; float order differs

    modes = {"torch bf16", *(["openvino fp32"] if "openvino" in backends else [])}
    assert modes <= set(rows["agreement"]["agreement"])
    for mode in modes:
        assert 0.0 <= rows["agreement"]["agreement"][mode] <= 1.0
    if "openvino" in backends:
        assert rows["agreement"]["agreement"]["openvino fp32"] == 1.0
    assert rows["agreement"]["pixels"] == 4 * 64 * 64

    goals = {q["goal"] for q in report["ratios"].values()}
    assert {"engine / ceiling (same precision)", "http / ceiling (same precision)", "engine / naive"} <= goals
    assert "cli / naive" in goals
    assert "engine fp32 torch / best ceiling, paired in one process" in report["ratios"]
    if "openvino" in backends:
        assert "engine fp32 openvino / ceiling fp32 torch" in report["ratios"]
    assert goals <= set(TARGETS)
    for q in report["ratios"].values():
        assert q["value"] > 0 and q["met"] == (q["value"] >= q["target"])

    table = proc.stdout
    assert "| row | backend | precision | Mpx/s |" in table
    for name in timed:
        assert f"| {name} |" in table


class _SignNet(torch.nn.Module):
    """Oracle valid network: class 1 where the centre-cropped input is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        core = x[:, :, 92:-92, 92:-92]
        return torch.cat([core, -core], dim=1)


def test_naive_baseline_is_exact_with_an_oracle_network() -> None:
    img = np.random.default_rng(0).normal(size=(500, 450)).astype(np.float32)
    labels = naive_segment(img, _SignNet(), lambda a: a.astype(np.float32))
    np.testing.assert_array_equal(labels, (img < 0).astype(np.uint8))


def test_monai_baseline_labels_have_the_image_shape() -> None:
    pytest.importorskip("monai")
    img = np.random.default_rng(1).normal(size=(100, 130)).astype(np.float32)
    labels = monai_segment(img, 2, lambda a: a.astype(np.float32))
    assert labels.shape == img.shape and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}


@pytest.mark.slow
def test_jobs_bench_runs_a_job_alone_and_beside_requests(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "jobs.json"
    cmd = [sys.executable, "-m", "bench.jobs", "--size", "300", "--small", "100", "--rounds", "1", "--requests", "2"]
    cmd += ["--checkpoint", str(tiny_checkpoint), "--precision", "fp32", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert len(result["job_alone_s"]) == len(result["job_loaded_s"]) == 1
    assert min(result["job_alone_s"] + result["job_loaded_s"]) > 0
    assert result["request_alone_s"] > 0 and 0 < result["request_loaded_s"] <= result["request_loaded_max_s"]
    assert result["requests_per_loaded_job"] >= 1  # the client's first request overlaps the job
    assert set(result["ratios"]) == {
        "job under load / job alone (time)",
        "request during a job / request alone (latency)",
        "both together / job alone (Mpx/s)",
    }
    assert all(v > 0 for v in result["ratios"].values())
    assert "| job alone, s (each round) |" in proc.stdout


def test_load_bench_holds_idle_connections_beside_posting_clients_and_reports(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "bench.load", "--idle", "50", "--clients", "2", "--seconds", "2", "--ramp-s", "0.5"]
    cmd += ["--checkpoint", str(tiny_checkpoint), "--healthz-budget-ms", "5000", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    health, clients, idle, server = report["healthz"], report["clients"], report["idle"], report["server"]
    assert health["probes"] > 0 and health["statuses"] == {"200": health["probes"]}
    assert 0 < health["p50_ms"] <= health["p99_ms"] <= health["max_ms"]
    assert clients["requests"] > 0 and set(clients["statuses"]) == {"200"}
    assert idle["held"] == 50 and idle["opened"] >= 50 and not idle["connect_errors"]
    assert server["fds_under_load"] >= server["fds_before"] + 50  # the server did hold them
    assert server["fds_after"] <= server["fds_before"]
    assert server["rss_before_mb"] > 0 and server["rss_peak_mb"] >= server["rss_before_mb"]
    assert all(report["checks"].values()), report["checks"]
    assert "| /healthz |" in proc.stdout and "ok   server descriptors back" in proc.stdout


def test_load_bench_refuses_a_target_off_the_loopback() -> None:
    cmd = [sys.executable, "-m", "bench.load", "--url", "http://example.com:8000", "--seconds", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "loopback only" in proc.stderr


def test_agreement_table_over_held_out_sets(tmp_path: Path) -> None:
    from service.cli import main

    assert main(["synth", "-o", str(tmp_path / "set"), "--n", "2", "--seed", "5", "--size", "96"]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "bench.agreement", str(tmp_path / "set")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| torch") or line.startswith("| openvino")]
    assert rows[0].startswith("| torch bf16 |")
    if openvino_available():
        assert "| openvino fp32 | 100.000% | 100.000% |" in proc.stdout
