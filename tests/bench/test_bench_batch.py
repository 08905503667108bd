"""``python -m bench.batch`` runs end to end on a few small images and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

from bench.batch import main


def test_the_bench_reports_both_rows_and_identical_masks(tmp_path: Path, tiny_checkpoint: Path) -> None:
    argv = ["--n", "2", "--size", "64", "--checkpoint", str(tiny_checkpoint), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    singles, batch = report["rows"]
    assert report["identical_masks"] is True and singles["seconds"] > 0 and batch["speedup"] > 0
