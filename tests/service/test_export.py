"""``unet-tile export`` and ``unet-tile import`` on the demo model: the ONNX and TorchScript files
label demo-like images as the checkpoint does; the bioimage.io package passes bioimageio.core's own
model test offline and imports back to the same checkpoint; what cannot be exported or imported is
refused with exit 2 and one line."""

from __future__ import annotations

import contextlib
import gc
import io
import socket
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tifffile
import torch

import unet
from service.cli import main
from service.export import PackageCheck
from tests.service.test_faults import files_under, filled, tmpfs
from unet.checkpoint import DEMO_CHECKPOINT
from unet.export import INPUT_NAME, OUTPUT_NAME
from unet.synth import synth_set

REPO = Path(__file__).resolve().parents[2]
LOCAL = ("127.0.0.1", "::1", "localhost")


@contextlib.contextmanager
def offline() -> Iterator[list[Any]]:
    """No connection or name lookup beyond this machine; the attempts are listed (and refused)."""
    attempts: list[Any] = []
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] in LOCAL):
            return real_connect(self, address)
        attempts.append(address)
        raise OSError("no network in this test")

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in LOCAL or host is None:
            return real_lookup(host, *args, **kwargs)
        attempts.append(host)
        raise socket.gaierror("no network in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", lookup)
        yield attempts


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def demo() -> unet.Checkpoint:
    return unet.load_checkpoint(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def windows(demo: unet.Checkpoint) -> list[npt.NDArray[np.float32]]:
    """Demo-like inputs as the service feeds them: synthetic nuclei images normalized with the
    checkpoint's normalization (fitted per image), in a 572 window and a batch of two 380 windows."""
    images = [s.image[None] for s in synth_set(3, seed=11, shape=(572, 572))]
    norm = [demo.normalization.fit(x)(x) for x in images]
    return [norm[0][None], np.stack([norm[1][:, 96:476, 96:476], norm[2][:, :380, 192:]])]


def torch_logits(model: unet.UNet, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        return np.asarray(model(torch.from_numpy(x)).numpy())


def assert_same_labels(got: npt.NDArray[Any], want: npt.NDArray[Any], atol: float) -> None:
    """Logits within ``atol``; labels equal wherever the best two classes are not tied within it."""
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    top2 = np.sort(want, axis=1)[:, -2:]
    differ = got.argmax(1) != want.argmax(1)
    assert not (differ & (top2[:, 1] - top2[:, 0] > 2 * atol)).any()


def jit_load(path: Path) -> Any:
    # torch 2.13 deprecates torch.jit.load; it is what TorchScript's consumers (deepImageJ, QuPath) call
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
        return torch.jit.load(str(path))


# --- ONNX and TorchScript -----------------------------------------------------------------


@pytest.mark.slow  # torch.export traces the network: ~15 s
def test_onnx_export_labels_demo_images_as_the_checkpoint_does(
    tmp_path: Path, demo: unet.Checkpoint, windows: list[npt.NDArray[np.float32]], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "demo.onnx"
    assert main(["export", "--format", "onnx", "-o", str(out)]) == 0
    assert one_line(capsys).startswith(f"export: wrote {out} (onnx, ")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x in windows:
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        assert_same_labels(got, torch_logits(demo.model, x), atol=1e-4)


def test_torchscript_export_labels_demo_images_as_the_checkpoint_does(
    tmp_path: Path, demo: unet.Checkpoint, windows: list[npt.NDArray[np.float32]], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo.pt"
    assert main(["export", str(DEMO_CHECKPOINT), "--format", "torchscript", "-o", str(out)]) == 0
    assert one_line(capsys).startswith(f"export: wrote {out} (torchscript, ")
    traced = jit_load(out)
    for x in windows:
        with torch.no_grad():
            got = traced(torch.from_numpy(x)).numpy()
        want = torch_logits(demo.model, x)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


# --- what is refused --------------------------------------------------------------------------


def test_an_unknown_format_a_bad_checkpoint_or_a_missing_directory_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--format", "tflite", "-o", str(tmp_path / "m.tflite")]) == 2
    assert (
        one_line(capsys) == "unet-tile: error: unknown --format 'tflite'; choose one of onnx, torchscript, bioimageio"
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["export", str(bad), "--format", "torchscript", "-o", str(tmp_path / "m.pt")]) == 2
    assert one_line(capsys).startswith(f"unet-tile: error: {bad}: corrupt or not a safetensors checkpoint")
    assert main(["export", "--format", "torchscript", "-o", str(tmp_path / "no" / "m.pt")]) == 2
    assert one_line(capsys) == f"unet-tile: error: output directory not found: {tmp_path / 'no'}"
    assert (
        main(["import", str(tmp_path / "nothing.zip"), "-o", str(tmp_path / "m.safetensors"), "--weights", "h5"]) == 2
    )
    assert one_line(capsys) == "unet-tile: error: unknown --weights 'h5'; choose one of auto, torchscript, onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_a_license_or_author_the_spec_refuses_exits_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("bioimageio.core")
    out = tmp_path / "m.zip"
    assert main(["export", "--format", "bioimageio", "-o", str(out), "--license", "Proprietary"]) == 2
    assert one_line(capsys) == (
        "unet-tile: error: unknown license 'Proprietary': give an SPDX license id (MIT, BSD-3-Clause, CC-BY-4.0, ...)"
    )
    assert main(["export", "--format", "bioimageio", "-o", str(out), "--author", "Lab A/B"]) == 2
    assert one_line(capsys).startswith("unet-tile: error: author 'Lab A/B': name: ")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_output_exits_2_with_one_line_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tmpfs(tmp_path / "ro", size="1m", readonly=True) as ro:
        assert main(["export", "--format", "torchscript", "-o", str(ro / "m.pt")]) == 2
        assert files_under(ro) == []
    assert one_line(capsys) == f"unet-tile: error: read-only file system while writing {ro / 'm.pt'}"
    with tmpfs(tmp_path / "small", size="4m") as small, filled(small, leave=1 << 20):
        assert main(["export", "--format", "torchscript", "-o", str(small / "m.pt")]) == 2  # the file is ~8 MB
        assert files_under(small) == ["filler"]
    assert one_line(capsys) == f"unet-tile: error: no space left on device while writing {small / 'm.pt'}"


@pytest.mark.parametrize(
    ("absent", "argv", "extra"),
    [
        ("onnx", ["export", "--format", "onnx"], "onnx"),
        ("onnxscript", ["export", "--format", "onnx"], "onnx"),
        ("bioimageio", ["export", "--format", "bioimageio"], "bioimageio"),
        ("bioimageio", ["import", "package.zip"], "bioimageio"),
    ],
    ids=["onnx", "onnxscript", "bioimageio-export", "bioimageio-import"],
)
def test_without_the_extra_the_cli_exits_2_naming_it(tmp_path: Path, absent: str, argv: list[str], extra: str) -> None:
    code = (
        f"import sys; sys.modules[{absent!r}] = None\n"  # as if not installed: importing it raises ImportError
        "from service.cli import main\n"
        f"sys.exit(main({[*argv, '-o', str(tmp_path / 'out')]!r}))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("unet-tile: error: ") and f"pip install 'unet-tile[{extra}]'" in line
    assert list(tmp_path.iterdir()) == []


# --- the bioimage.io package ------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The demo model exported as a bioimage.io package by the CLI (which runs bioimageio.core's test
    first), offline, with bioimage.io's cache pointed at a folder that must stay empty."""
    root = tmp_path_factory.mktemp("bioimageio")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOIMAGEIO_CACHE_PATH", str(cache))  # read when bioimageio.spec is first imported
        for name in ("bioimageio.core", "onnxscript", "onnxruntime"):
            pytest.importorskip(name)
        out, err = root / "demo.zip", io.StringIO()
        argv = ["export", "--format", "bioimageio", "-o", str(out), "--author", "A. Tester", "--tag", "nuclei"]
        with offline() as attempts, contextlib.redirect_stderr(err):
            code = main(argv)
        assert code == 0, err.getvalue()
        assert attempts == []
        lines = err.getvalue().strip().splitlines()
        assert lines[0] == "export: bioimageio.core model test passed (17 checks)", lines
        assert lines[1].startswith(f"export: wrote {out} (bioimageio, ")
        yield out
    assert not cache.exists()  # nothing downloaded, nothing cached


@pytest.mark.slow  # the package fixture (~25 s), then ~5 s: bioimageio.core runs both formats at 7 inputs
# bioimageio.core's own doings, not ours: it loads TorchScript with torch.jit.load (deprecated in torch
# 2.13) and leaves files it read open until they are collected
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:unclosed file:ResourceWarning")
@pytest.mark.parametrize("weights", [None, "torchscript"], ids=["all-weights", "torchscript-only"])
def test_the_package_passes_bioimageio_cores_own_model_test_offline(
    package: Path, weights: str | None, pytestconfig: pytest.Config
) -> None:
    import bioimageio.core  # imported as a module: pytest would collect its test_model as a test

    with offline() as attempts:
        summary = bioimageio.core.test_model(package, weight_format=weights, devices=["cpu"])
    gc.collect()  # the files it left open are closed here, under this test's warning filters
    report = PackageCheck(
        str(summary.status),
        tuple((d.name, d.status) for d in summary.details),
        tuple(e.msg for d in summary.details for e in d.errors),
        (),
    )
    assert attempts == []
    assert report.passed, report.errors
    names = dict(report.checks)
    assert all(status == "passed" for status in names.values()), report.checks
    for fmt in ("torchscript",) if weights else ("torchscript", "onnx"):
        assert names[f"Reproduce test outputs from test inputs ({fmt})"] == "passed"
        for b in (1, 2):
            for n in (0, 1, 2):  # inputs of 188, 204 and 220 px: the parameterized sizes
                assert (
                    names[f"Run {fmt} inference for inputs with batch_size: {b} and size parameter n: {n}"] == "passed"
                )
    if weights is None and pytestconfig.getoption("verbose") > 0:
        print(summary.format())


@pytest.mark.slow  # the package fixture: ~25 s, once for the module (slow tests use it too)
def test_the_package_describes_the_valid_padding_network(package: Path, demo: unet.Checkpoint) -> None:
    from bioimageio.spec import load_model_description
    from bioimageio.spec.model import v0_5

    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        readme = z.read("README.md").decode()
    assert {"rdf.yaml", "README.md", "cover.png", "weights_torchscript.pt", "weights.onnx"} <= names
    assert "## Validation" in readme and "held-out" in readme
    with zipfile.ZipFile(package) as z:  # our handle: bioimageio.spec would leave the one it opens open
        d = load_model_description(z, perform_io_checks=False)
    assert isinstance(d, v0_5.ModelDescr)
    assert d.format_version.startswith("0.5.")
    (ipt,), (out,) = d.inputs, d.outputs
    assert [str(a.id) for a in ipt.axes] == ["batch", "channel", "y", "x"]
    for axis in ipt.axes[2:]:
        assert axis.size == v0_5.ParameterizedSize(min=188, step=16)
    for axis in out.axes[2:]:
        assert axis.size == v0_5.SizeReference(tensor_id=ipt.id, axis_id=axis.id, offset=-184)
    assert getattr(out.axes[1], "channel_names", None) == list(demo.class_names)
    (scale,) = [p for p in ipt.preprocessing if p.id != "ensure_dtype"]
    assert isinstance(scale, v0_5.ScaleRangeDescr)
    assert (scale.kwargs.min_percentile, scale.kwargs.max_percentile) == (1.0, 99.8)
    assert [str(a) for a in scale.kwargs.axes or []] == ["y", "x"]
    assert [p.id for p in out.postprocessing if p.id != "ensure_dtype"] == []  # logits: no softmax
    assert d.weights.torchscript is not None and d.weights.onnx is not None
    assert d.weights.onnx.opset_version == 20
    assert str(d.license) == "MIT" and [a.name for a in d.authors] == ["A. Tester"]
    assert str(d.cite[0].doi) == "10.1007/978-3-319-24574-4_28"
    assert {"unet", "torchscript", "onnx", "nuclei"} <= set(d.tags) and d.covers
    ours = (d.config.model_extra or {})["unet_tile"]
    assert ours["unet"] == demo.config.to_dict()
    assert ours["class_names"] == list(demo.class_names) and ours["foreground"] == list(demo.foreground)
    assert ours["normalization"] == demo.normalization.to_dict() and ours["checkpoint_sha256"] == demo.sha256


@pytest.mark.slow  # the package fixture; then ~1 s each: the test output reproduced, 3 windows labelled
@pytest.mark.parametrize("weights", ["torchscript", "onnx", "folder"])
def test_export_then_import_gives_the_same_checkpoint(
    package: Path,
    demo: unet.Checkpoint,
    windows: list[npt.NDArray[np.float32]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    weights: str,
) -> None:
    source = package
    if weights == "folder":
        source = tmp_path / "unzipped"
        zipfile.ZipFile(package).extractall(source)

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("import ran the package's TorchScript")

    monkeypatch.setattr(torch.jit, "load", refuse)
    out = tmp_path / "back.safetensors"
    argv = ["import", str(source), "-o", str(out)] + ([] if weights == "folder" else ["--weights", weights])
    assert main(argv) == 0
    fmt = "onnx" if weights == "onnx" else "torchscript"
    assert one_line(capsys).startswith(f"import: wrote {out} (sha256 ")
    back = unet.load_checkpoint(out)
    want, got = demo.model.state_dict(), back.model.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        if fmt == "onnx" and k.endswith("num_batches_tracked"):
            assert int(got[k]) == 0  # a graph holds no step counters
        else:
            assert torch.equal(got[k], want[k]), k
    assert back.config == demo.config
    assert (back.class_names, back.foreground, back.instances) == (demo.class_names, demo.foreground, demo.instances)
    assert back.normalization == demo.normalization
    assert back.info["held_out"] == demo.info["held_out"]  # the training provenance travels in config.unet_tile
    imported = back.info["imported_from"]
    assert (imported["weights"], imported["checkpoint_sha256"]) == (fmt, demo.sha256)
    assert imported["test_output_max_abs_diff"] == 0.0
    for x in windows:
        np.testing.assert_array_equal(torch_logits(back.model, x), torch_logits(demo.model, x))


def _unzipped(package: Path, where: Path) -> Path:
    zipfile.ZipFile(package).extractall(where)
    return where


def _edit(folder: Path, change: Any) -> None:
    yaml = pytest.importorskip("yaml")
    rdf = folder / "rdf.yaml"
    data = yaml.safe_load(rdf.read_text())
    change(data, folder)
    rdf.write_text(yaml.safe_dump(data, sort_keys=False))


def _only_state_dict(data: dict[str, Any], folder: Path) -> None:
    (folder / "arch.py").write_text(f"open({str(folder / 'RAN')!r}, 'w')\n")  # would leave a trace if run
    (folder / "weights.pth").write_bytes(b"")
    data["weights"] = {
        "pytorch_state_dict": {
            "source": "weights.pth",
            "architecture": {"source": "arch.py", "callable": "UNet"},
            "pytorch_version": "2.13",
        }
    }


def _only_keras(data: dict[str, Any], folder: Path) -> None:
    (folder / "weights.h5").write_bytes(b"")
    data["weights"] = {"keras_hdf5": {"source": "weights.h5", "tensorflow_version": "2.15"}}


def _missing_weights(data: dict[str, Any], folder: Path) -> None:
    (folder / "weights_torchscript.pt").unlink()
    del data["weights"]["onnx"]


def _wider_config(data: dict[str, Any], folder: Path) -> None:
    data["config"]["unet_tile"]["unet"]["base_width"] = 32


def _other_network(data: dict[str, Any], folder: Path) -> None:
    del data["config"]["unet_tile"]  # inferred from the weights, which are ours; the test output is not
    np.save(folder / "test_output.npy", np.load(folder / "test_output.npy") * 2)
    data["outputs"][0]["test_tensor"].pop("sha256")


def _other_preprocessing(data: dict[str, Any], folder: Path) -> None:
    data["inputs"][0]["preprocessing"] = [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"]}}]


def _padded_output(data: dict[str, Any], folder: Path) -> None:
    for axis in data["outputs"][0]["axes"][2:]:
        axis["size"]["offset"] = 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_only_state_dict, "has pytorch_state_dict weights; unet-tile imports torchscript or onnx weights (pytorch_state_dict needs the package's Python architecture code, which unet-tile never runs)"),
        (_only_keras, "has keras_hdf5 weights; unet-tile imports torchscript or onnx weights"),
        (_missing_weights, "the package lacks its torchscript weights (weights_torchscript.pt)"),
        (_wider_config, "config.unet_tile describes UNetConfig(in_channels=1, num_classes=3, depth=4, base_width=32"),
        (_other_network, "the rebuilt U-Net does not reproduce the package's test output"),
        (_other_preprocessing, "input preprocessing 'zero_mean_unit_variance'; unet-tile reads scale_range"),
        (_padded_output, "output axis y is not the input's size - 184"),
    ],
    ids=["pytorch_state_dict", "keras", "missing-weights", "other-config", "other-network", "zero-mean", "padded"],
)  # fmt: skip
@pytest.mark.slow  # the package fixture
def test_import_refuses_what_it_cannot_rebuild_with_one_line(
    package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, message: str
) -> None:
    folder = _unzipped(package, tmp_path / "pkg")
    _edit(folder, change)
    out = tmp_path / "m.safetensors"
    assert main(["import", str(folder), "-o", str(out)]) == 2
    line = one_line(capsys)
    assert line.startswith("unet-tile: error: ") and message in line, line
    assert not out.exists() and not (folder / "RAN").exists()


def test_import_refuses_a_folder_that_is_no_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("bioimageio.spec")
    (tmp_path / "rdf.yaml").write_text("type: model\nname: nothing here\n")
    assert main(["import", str(tmp_path), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert one_line(capsys).startswith(f"unet-tile: error: {tmp_path}: not a valid bioimage.io model package (")


@pytest.mark.slow  # ~3 s on an idle machine, 8 on a busy one: a trace and a package (its ONNX faked)
def test_a_package_that_fails_its_test_is_not_written_and_a_sample_image_is_its_test_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("bioimageio.core")
    import service.export

    def fake_onnx(model: unet.UNet, path: Path, *, opset: int) -> Path:
        path.write_bytes(b"not a graph")  # the description only hashes it; no test reads it here
        return path

    failed = PackageCheck("failed", (("Reproduce test outputs", "failed"),), ("Reproduce test outputs: off",), ())
    monkeypatch.setattr(service.export.unet_export, "export_onnx", fake_onnx)
    monkeypatch.setattr(service.export, "check_package", lambda path: failed)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", "--format", "bioimageio", "-o", str(out / "m.zip")]) == 1
    assert one_line(capsys) == (
        "unet-tile: error: the package fails bioimage.io's model test: Reproduce test outputs: off"
    )
    assert list(out.iterdir()) == []
    image = np.random.default_rng(3).integers(0, 4000, (400, 500)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "sample.tif", image)
    argv = ["export", "--format", "bioimageio", "-o", str(out / "m.zip"), "--sample", str(tmp_path / "sample.tif")]
    assert main([*argv, "--no-test", "--name", "my nuclei model"]) == 0
    with zipfile.ZipFile(out / "m.zip") as z:
        test_input = np.load(io.BytesIO(z.read("test_input.npy")))
        rdf = z.read("rdf.yaml").decode()
    np.testing.assert_array_equal(test_input, image[10:390, 60:440][None, None].astype(np.float32))  # the central 380
    assert "name: my nuclei model" in rdf
