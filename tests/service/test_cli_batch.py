"""``unet-tile segment`` on many images (``IMG...``, ``--dir``) with one model, and the options
every subcommand shares (``-o/--output``, ``--kind``, ``-v`` and ``--version`` anywhere)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import unet
from service.cli import main, version
from unet.atomic import atomic_path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        tifffile.imwrite(d / f"img{i}.tif", rng.integers(0, 4000, (90 + 10 * i, 120)).astype(np.uint16))
    (d / "bad.tif").write_bytes(b"II*\x00 not really a TIFF")
    (d / "notes.txt").write_text("not an image")
    return d


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_folder_gives_each_image_the_mask_of_a_single_run_and_reports_the_bad_one(
    folder: Path, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    model = ["--checkpoint", str(tiny_checkpoint), "--precision", "fp32", "-q"]
    code, err = run(capsys, "segment", "--dir", str(folder), "--outdir", str(out), *model)
    assert code == 1  # one file failed: reported, skipped, listed at the end
    assert err[-2:] == ["unet-tile: 3 of 4 segmented" + err[-2].split("segmented")[1], err[-1]]
    assert err[-2].endswith(", 1 failed:") and err[-1].startswith(f"  {folder / 'bad.tif'}: ")
    assert any(line.startswith(f"unet-tile: skipped {folder / 'bad.tif'}: ") for line in err)
    assert sorted(p.name for p in out.iterdir()) == ["img0_masks.tif", "img1_masks.tif", "img2_masks.tif"]
    for i in range(3):  # the same bytes a single run writes
        single = tmp_path / f"single{i}.tif"
        assert main(["segment", str(folder / f"img{i}.tif"), "-o", str(single), *model]) == 0
        assert (out / f"img{i}_masks.tif").read_bytes() == single.read_bytes()
    capsys.readouterr()
    stamp = (out / "img0_masks.tif").stat().st_mtime_ns
    code, err = run(capsys, "segment", "--dir", str(folder), "--outdir", str(out), "--skip-existing", *model)
    assert code == 1 and ", 3 skipped (outputs exist), 1 failed:" in err[-2]
    assert (out / "img0_masks.tif").stat().st_mtime_ns == stamp


def test_inputs_names_and_side_outputs_as_patterns(
    folder: Path, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["segment", str(folder / "img0.tif"), str(folder / "img2.tif"), "--outdir", str(out)]
    args += ["--kind", "instances", "--name", "{stem}.labels.tif", "--table", "{stem}.csv", "--preview", "{stem}.png"]
    code, err = run(capsys, *args, "--checkpoint", str(tiny_checkpoint), "-q")
    assert code == 0 and err[-1].startswith("unet-tile: 2 of 2 segmented")
    names = ["img0.csv", "img0.labels.tif", "img0.png", "img2.csv", "img2.labels.tif", "img2.png"]
    assert sorted(p.name for p in out.iterdir()) == names


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "x.tif"], "with several inputs or --dir, give --outdir DIR (and --name PATTERN), not -o"),
        (
            ["--outdir", "OUT", "--name", "same.tif"],
            "img0.tif and img1.tif would both write same.tif: put {stem} in the names",
        ),
        (
            ["--outdir", "OUT", "--name", "sub/{stem}.tif"],
            "--name is a file name pattern, without a directory: got 'sub/{stem}.tif'",
        ),
        (
            ["--outdir", "OUT", "--name", "{steam}.tif"],
            "--name '{steam}.tif': the placeholders are {stem}, {name} and {kind} ('steam')",
        ),
        (
            ["--outdir", "OUT", "--kind", "instances", "--table", "objects.csv"],
            "with several inputs --table is a name pattern, such as '{stem}_table...': got 'objects.csv'",
        ),
    ],
)
def test_batch_options_that_do_not_go_together_are_one_line(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    code, err = run(capsys, "segment", str(folder / "img0.tif"), str(folder / "img1.tif"), *extra)
    assert (code, err) == (2, [f"unet-tile: error: {message}"])
    assert not (tmp_path / "out").exists()


def test_single_file_options_old_and_new(
    folder: Path, tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--checkpoint", str(tiny_checkpoint), "-q"]
    src = str(folder / "img1.tif")
    assert main(["segment", src, "-o", str(tmp_path / "a.tif"), "--output", "probabilities", *model]) == 0  # as before
    assert main(["segment", src, "--output", str(tmp_path / "b.tif"), "--kind", "probabilities", *model]) == 0
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    assert tifffile.imread(tmp_path / "a.tif").dtype == np.float32
    capsys.readouterr()
    code, err = run(capsys, "segment", src, "-o", str(tmp_path / "c.tif"), "--skip-existing")
    assert (code, err) == (
        2,
        ["unet-tile: error: --name and --skip-existing go with --outdir (several inputs or --dir)"],
    )
    code, err = run(capsys, "segment", "-o", str(tmp_path / "c.tif"))
    assert (code, err) == (2, ["unet-tile: error: give an input image, several, or --dir DIR"])


@pytest.mark.parametrize("argv", [["--version"], ["segment", "--version"], ["train", "--version"]])
def test_version_anywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"unet-tile {version()}"


def test_verbose_after_the_subcommand(folder: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    src, dst = str(folder / "img0.tif"), str(tmp_path / "m.tif")
    argv = [sys.executable, "-m", "service.cli", "segment", src, "-o", dst, "--checkpoint", str(tiny_checkpoint), "-q"]
    done = subprocess.run([*argv, "-v"], capture_output=True, text=True, check=True)
    assert " INFO service.cli.segment: wrote " in done.stderr


def test_outputs_are_readable_by_group_and_others_under_umask_022(tmp_path: Path) -> None:
    """What colleagues on a shared volume need: the mode an ordinary ``open`` would give."""
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f.txt") as part:
            part.write_text("x")
        with atomic_path(tmp_path / "store.zarr", directory=True) as part:
            (part / "zarr.json").write_text("{}")
        unet.save_checkpoint(tmp_path / "ck.safetensors", unet.UNet(unet.UNetConfig(depth=1, base_width=2)))
        tifffile.imwrite(tmp_path / "in.tif", np.zeros((40, 40), np.uint8))
        args = ["segment", str(tmp_path / "in.tif"), "-o", str(tmp_path / "mask.tif"), "-q"]
        assert main([*args, "--checkpoint", str(tmp_path / "ck.safetensors")]) == 0
    finally:
        os.umask(old)
    for name, mode in (("f.txt", 0o644), ("store.zarr", 0o755), ("ck.safetensors", 0o644), ("mask.tif", 0o644)):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
