"""``unet-tile synth``, ``train`` and ``evaluate`` end to end on tiny data, and their refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import unet
from service.cli import main


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """``train --threads`` sets torch's thread count for the process; give it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    assert main(["synth", "-o", str(out), "--n", "3", "--size", "64", "80", "--seed", "4", "-q"]) == 0
    return out


TRAIN_TINY = ["--steps", "3", "--base-width", "2", "--patch-size", "188", "--batch-size", "1", "--threads", "1", "-q"]


def test_synth_writes_matching_image_and_mask_pairs(dataset: Path) -> None:
    images = sorted((dataset / "images").iterdir())
    masks = sorted((dataset / "masks").iterdir())
    assert [p.name for p in images] == [p.name for p in masks] == ["synth_0000.tif", "synth_0001.tif", "synth_0002.tif"]
    for image, mask in zip(images, masks, strict=True):
        img, lab = tifffile.imread(image), tifffile.imread(mask)
        assert img.shape == lab.shape == (64, 80)
        assert img.dtype in (np.uint8, np.uint16) and lab.dtype == np.uint16


def test_synth_is_reproducible(dataset: Path, tmp_path: Path) -> None:
    assert main(["synth", "-o", str(tmp_path / "again"), "--n", "2", "--size", "64", "80", "--seed", "4", "-q"]) == 0
    for name in ("synth_0000.tif", "synth_0001.tif"):
        a = tifffile.imread(dataset / "images" / name)
        assert np.array_equal(a, tifffile.imread(tmp_path / "again" / "images" / name))


def test_synth_workers_write_the_same_files(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    assert main(["synth", "-o", str(out), "--n", "3", "--size", "64", "80", "--seed", "4", "--workers", "2", "-q"]) == 0
    for kind in ("images", "masks"):
        names = sorted(p.name for p in (dataset / kind).iterdir())
        assert names == sorted(p.name for p in (out / kind).iterdir())
        for name in names:
            assert (dataset / kind / name).read_bytes() == (out / kind / name).read_bytes()


def test_train_then_evaluate(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    imgs, masks = str(dataset / "images"), str(dataset / "masks")
    argv = ["train", "--images", imgs, "--masks", masks, "-o", str(out), "--seed", "5", *TRAIN_TINY]
    assert main([*argv, "--val-images", imgs, "--val-masks", masks]) == 0
    ck = unet.load_checkpoint(out)
    assert ck.config == unet.UNetConfig(base_width=2)
    assert ck.class_names == ("background", "nucleus") and ck.foreground == (1,)
    assert ck.normalization == unet.Normalization(method="percentile", low=1.0, high=99.8)
    info = ck.info
    assert info["seed"] == 5 and info["steps"] == 3 and info["wall_time_s"] >= 0
    assert info["command"].startswith("unet-tile train --images ") and "--seed 5" in info["command"]
    assert "--device cpu" in info["command"] and "--dice" not in info["command"]  # auto resolved; no Dice term
    assert 0.0 <= info["held_out"]["dice"] <= 1.0 and info["data"]["planes"] == 3
    assert (tmp_path / "m.safetensors.state.pt").is_file()

    capsys.readouterr()
    assert main(["evaluate", "--images", imgs, "--masks", masks, "--checkpoint", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["image", "dice", "iou", "f1@0.5"]
    assert [line.split()[0] for line in lines[1:4]] == ["synth_0000", "synth_0001", "synth_0002"]
    overall = lines[4].split()
    assert overall[0] == "overall"
    assert float(overall[1]) == pytest.approx(info["held_out"]["dice"], abs=1e-4)  # same engine, same numbers
    assert float(overall[3]) == pytest.approx(info["held_out"]["f1"], abs=1e-4)
    assert unet.load_checkpoint(out).instances == {  # the rule instances of this model follow: components
        "seeds": [1],
        "grow": [],
        "min_area": 0,
        "grow_px": 4,
        "fill_holes": True,
    }


def _threshold_checkpoint(path: Path) -> Path:
    """A 2-class checkpoint whose background-vs-nucleus margin is ``normalized input - 0.5``."""
    from bench.instances import threshold_checkpoint

    return threshold_checkpoint(path)


def test_evaluate_scores_a_perfect_model_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose network outputs 'nucleus' where the input is bright: Dice 1 on a clean mask."""
    checkpoint = _threshold_checkpoint(tmp_path / "thr.safetensors")
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    mask = np.zeros((40, 50), np.uint16)
    mask[5:15, 5:20] = 1
    mask[25:35, 30:45] = 2
    tifffile.imwrite(tmp_path / "i" / "a.tif", (mask > 0).astype(np.uint8) * 200 + 10)
    tifffile.imwrite(tmp_path / "m" / "a.tif", mask)
    argv = ["evaluate", "--images", str(tmp_path / "i"), "--masks", str(tmp_path / "m")]
    assert main([*argv, "--checkpoint", str(checkpoint), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "overall" in out
    assert out.splitlines()[1].split() == ["a", "1.0000", "1.0000", "1.0000"]  # both objects found, whole


def test_calibration_picks_the_offset_that_finds_dim_objects(tmp_path: Path) -> None:
    """Dim objects (normalized 0.3: margin -0.2) are missed at offset 0 and found below -0.2;
    the bias folded into the head reproduces the calibrated Dice through the serving path."""
    from service.cli.train import calibrate_background, evaluate_pairs, find_pairs
    from service.segmenter import Segmenter

    ck = unet.load_checkpoint(_threshold_checkpoint(tmp_path / "thr.safetensors"))
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    mask = np.zeros((40, 50), np.uint16)
    mask[5:15, 5:20] = 1  # bright
    mask[25:35, 30:45] = 2  # dim
    image = np.full(mask.shape, 10, np.uint8)
    image[mask == 1], image[mask == 2] = 210, 70  # normalized: 1.0 and 0.3, background 0
    tifffile.imwrite(tmp_path / "i" / "a.tif", image)
    tifffile.imwrite(tmp_path / "m" / "a.tif", mask)
    pairs = find_pairs(tmp_path / "i", tmp_path / "m")
    best, scores = calibrate_background(Segmenter(ck, device="cpu"), pairs)
    assert scores[0.0] == pytest.approx(2 * 150 / (150 + 300))  # only the bright object
    assert best == -0.3 and scores[best] == 1.0  # -0.3 .. -0.4 all work: the smallest shift wins
    with torch.no_grad():
        ck.model.head.bias[0] += best
    [(_, o)] = evaluate_pairs(Segmenter(ck, device="cpu"), pairs)
    assert o.dice == 1.0


def test_train_three_classes_with_calibration(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m3.safetensors"
    imgs, masks = str(dataset / "images"), str(dataset / "masks")
    argv = ["train", "--images", imgs, "--masks", masks, "-o", str(out), *TRAIN_TINY, "--classes", "3"]
    assert main([*argv, "--calibrate"]) == 2
    assert "--calibrate needs a validation set" in _error_line(capsys)
    assert not out.exists()
    extra = ["--dice", "0.5", "--loader-threads", "1", "--device", "cpu", "--boundary-width", "2"]
    assert main([*argv, *extra, "--calibrate", "--val-images", imgs, "--val-masks", masks]) == 0
    ck = unet.load_checkpoint(out)
    assert ck.config.num_classes == 3
    assert ck.class_names == ("background", "nucleus", "boundary") and ck.foreground == (1, 2)
    info = ck.info
    assert "--classes 3" in info["command"] and info["command"].endswith("--calibrate")
    assert "--device cpu" in info["command"] and "--dice 0.5" in info["command"] and info["train"]["dice"] == 0.5
    assert "--boundary-width 2" in info["command"]
    assert info["calibration"]["background_logit_offset"] in [round(0.1 * i, 1) for i in range(-20, 11)]
    # calibrated on the validation set: it can only have helped there (fp16 storage aside)
    assert info["held_out"]["dice"] >= info["calibration"]["dice_before"] - 1e-3
    # and the instances' minimum area: the best of those tried, recorded in the rule
    f1_at = info["calibration"]["instance_f1"]
    assert ck.instances is not None and ck.instances["min_area"] == info["calibration"]["min_area"]
    assert ck.instances["seeds"] == [1] and ck.instances["grow"] == [2]
    assert f1_at[str(ck.instances["min_area"])] == max(f1_at.values())
    assert info["held_out"]["f1"] == pytest.approx(f1_at[str(ck.instances["min_area"])], abs=0.02)  # fp16 storage
    # --boundary-width 2 is refused with 2 classes
    capsys.readouterr()
    assert main([*argv[:-2], "--boundary-width", "2", "--classes", "2"]) == 2
    assert "--boundary-width 2: needs --classes 3" in _error_line(capsys)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unet-tile: error: ")
    return err[0]


def test_train_refuses_bad_input_and_writes_nothing(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    imgs, masks = str(dataset / "images"), str(dataset / "masks")
    base = ["train", "-o", str(out), *TRAIN_TINY]
    assert main([*base, "--images", str(tmp_path / "nope"), "--masks", masks]) == 2
    assert "images directory not found" in _error_line(capsys)
    assert main([*base, "--images", imgs, "--masks", masks, "--patch-size", "200"]) == 2
    assert "nearest valid sizes: 188 or 204" in _error_line(capsys)
    assert main([*base, "--images", imgs, "--masks", masks, "--val-images", imgs]) == 2
    assert "go together" in _error_line(capsys)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    tifffile.imwrite(lonely / "x.tif", np.zeros((30, 30), np.uint8))
    assert main([*base, "--images", str(lonely), "--masks", masks]) == 2
    assert "no mask" in _error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal
        main([*base, "--images", imgs, "--masks", masks, "--loader-threads", "-1"])
    assert exit_info.value.code == 2
    assert "--loader-threads: expected an integer >= 0, got -1" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("m.safetensors*"))


def test_evaluate_refuses_mismatched_pairs_and_missing_checkpoint(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path
) -> None:
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    tifffile.imwrite(tmp_path / "i" / "a.tif", np.zeros((30, 30), np.uint8))
    tifffile.imwrite(tmp_path / "m" / "a.tif", np.zeros((30, 31), np.uint8))
    argv = ["evaluate", "--images", str(tmp_path / "i"), "--masks", str(tmp_path / "m"), "--device", "cpu"]
    assert main([*argv, "--checkpoint", str(tiny_checkpoint)]) == 2
    assert "does not match image" in _error_line(capsys)
    assert main([*argv, "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "checkpoint not found" in _error_line(capsys)


def test_synth_refuses_a_used_directory(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in (dataset / "images").iterdir())
    assert main(["synth", "-o", str(dataset), "--n", "1", "-q"]) == 2
    assert "is not empty" in _error_line(capsys)
    assert sorted(p.name for p in (dataset / "images").iterdir()) == before
