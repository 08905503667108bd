"""``python -m bench.preview`` runs end to end on a small image and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.preview import main


def test_the_bench_reports_both_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--size", "600", "--threshold-model", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    labels, preview = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert labels["row"] == "labels" and preview["row"] == "labels + preview pyramid"
    assert labels["preview_bytes"] == 0 and preview["preview_bytes"] > 0 and preview["mask_bytes"] > 0
    assert preview["peak_rss_mib"] > 0 and preview["time_vs_labels"] > 0
    assert "peak RSS MiB" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
