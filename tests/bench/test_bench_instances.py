"""``python -m bench.instances`` runs end to end on a small image and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bench.instances import main, write_nuclei


def test_the_input_is_synthetic_nuclei_of_the_size_asked(tmp_path: Path) -> None:
    write_nuclei(tmp_path / "big.tif", 600, piece=256)
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        page = tif.pages.first
        assert tif.is_bigtiff and page.is_tiled and page.shape == (600, 600) and page.dtype == np.uint16
        image = page.asarray()
    assert image.std() > 0 and not np.array_equal(image[:256, :256], image[:256, 256:512])


def test_the_bench_reports_both_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--size", "400", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    labels, inst = report["rows"]
    assert labels["row"] == "labels" and inst["row"] == "instances + table"
    assert int(inst["objects"]) > 0 and inst["peak_rss_mib"] > 0 and inst["time_vs_labels"] > 0
    assert "peak RSS MiB" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the image and outputs went with the temp dir
