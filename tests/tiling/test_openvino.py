"""The OpenVINO backend: the same contract as the torch predictor (exact at fp32, close at
reduced precision), its cache, and what happens without the extra."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

import tiling
from tests.conftest import make_model
from tiling import TilingError
from tiling.openvino import openvino_available
from unet import geometry

MARGIN = geometry.context_margin(4)
ROOT = Path(__file__).resolve().parents[2]
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="the openvino extra is not installed")


class Crop(nn.Module):
    """The oracle valid network as a module OpenVINO can convert: a centre crop by the margin."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, MARGIN:-MARGIN, MARGIN:-MARGIN]


def _ov(module: nn.Module, precision: str = "fp32", cache: Path | None = None) -> tiling.Predictor:
    from tiling.openvino import OpenVINOPredictor

    return OpenVINOPredictor(module, precision=precision, depth=4, cache_dir=cache)


def _demo_image(size: int = 900, seed: int = 7) -> npt.NDArray[np.uint16]:
    from unet.synth import synth_set

    image: npt.NDArray[np.uint16] = synth_set(1, seed=seed, shape=(size, size), dtype="uint16")[0].image
    return image


@pytest.fixture(scope="module")
def demo() -> object:
    from unet.checkpoint import DEMO_CHECKPOINT, load_checkpoint

    return load_checkpoint(DEMO_CHECKPOINT)


@needs_openvino
@pytest.mark.parametrize(
    ("shape", "tile"), [((1, 1), 388), ((389, 777), 388), ((389, 777), 644), ((1000, 650), 388), ((90, 70), 4)]
)
def test_identity_model_reproduces_the_input_exactly(shape: tuple[int, int], tile: int) -> None:
    img = np.random.default_rng(shape[0]).integers(0, 255, size=(2, *shape)).astype(np.float32)
    out = tiling.segment(img, _ov(Crop()), output="probabilities", tile_size=tile, normalize=None)
    # probabilities of the identity's "logits": the softmax over the 2 channels, exactly as numpy's
    e = np.exp(img - img.max(0))
    np.testing.assert_allclose(out, e / e.sum(0), rtol=1e-6)
    labels = tiling.segment(img, _ov(Crop()), tile_size=tile, normalize=None)
    np.testing.assert_array_equal(labels, img.argmax(0))


@needs_openvino
def test_fp32_tiles_equal_one_whole_image_pass_and_the_torch_labels(demo: object) -> None:
    """At fp32 the tile size changes nothing, and the labels are eager PyTorch's."""
    ck = demo
    image = _demo_image()
    affine = ck.normalization.fit(image[None])  # type: ignore[attr-defined]
    ov = tiling.build_predictor(ck.model, backend="openvino", precision="fp32")  # type: ignore[attr-defined]
    small = tiling.segment(image, ov, normalize=affine, tile_size=388)
    whole = tiling.segment(image, ov, normalize=affine, tile_size=900)  # the whole image in one pass
    np.testing.assert_array_equal(small, whole)
    torch_labels = tiling.segment(image, ck.model, normalize=affine)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(small, torch_labels)
    probabilities = tiling.segment(image, ov, normalize=affine, output="probabilities")
    reference = tiling.segment(image, ck.model, normalize=affine, output="probabilities")  # type: ignore[attr-defined]
    np.testing.assert_allclose(probabilities, reference, atol=1e-4)


@needs_openvino
def test_bf16_agrees_with_fp32(demo: object) -> None:
    ck = demo
    image = _demo_image(seed=8)
    affine = ck.normalization.fit(image[None])  # type: ignore[attr-defined]
    ref = tiling.segment(image, ck.model, normalize=affine)  # type: ignore[attr-defined]
    bf16 = tiling.segment(image, _ov(ck.model, "bf16"), normalize=affine)  # type: ignore[attr-defined]
    assert (bf16 == ref).mean() >= 0.999


@needs_openvino
@pytest.mark.parametrize(("precision", "hint"), [("fp32", "f32"), ("bf16", "bf16")])
def test_the_precision_hint_is_always_set(precision: str, hint: str) -> None:
    """OpenVINO's CPU plugin runs bf16 by itself on a CPU that has it: fp32 must say f32."""
    import openvino as ov

    predictor = _ov(make_model(), precision)
    for compiled in (predictor._compiled, predictor._compiled_labels):  # type: ignore[attr-defined]
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == getattr(ov.Type, hint)


@needs_openvino
def test_the_converted_network_is_cached_and_rebuilt_when_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model(seed=4)
    x = np.random.default_rng(0).normal(size=(1, 1, 188, 188)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="tiling.openvino"):
        first = _ov(model, cache=tmp_path).predict_labels(x)
    assert "converting" in caplog.text
    (entry,) = (tmp_path / "openvino").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["model.bin", "model.xml"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tiling.openvino"):
        np.testing.assert_array_equal(_ov(model, cache=tmp_path).predict_labels(x), first)
    assert "converting" not in caplog.text  # read back, not converted again
    (entry / "model.xml").write_text("<not a model")
    with caplog.at_level(logging.INFO, logger="tiling.openvino"):
        np.testing.assert_array_equal(_ov(model, cache=tmp_path).predict_labels(x), first)
    assert "unreadable" in caplog.text and "converting" in caplog.text
    assert not [p for p in (tmp_path / "openvino").iterdir() if p.name.startswith(".")]  # no scratch left


@needs_openvino
def test_an_unwritable_cache_only_costs_the_conversion(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    with caplog.at_level(logging.WARNING, logger="tiling.openvino"):
        labels = _ov(make_model(), cache=blocked).predict_labels(np.zeros((1, 1, 188, 188), np.float32))
    assert labels.shape == (1, 4, 4)
    assert "cannot cache" in caplog.text


@needs_openvino
@pytest.mark.slow
def test_int8_agrees_with_fp32(demo: object, tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    from service.segmenter import calibration_windows

    ck = demo
    int8 = tiling.build_predictor(
        ck.model,  # type: ignore[attr-defined]
        backend="openvino",
        precision="int8",
        cache_dir=tmp_path,
        calibration=lambda: calibration_windows(ck, 8),  # type: ignore[arg-type]
    )
    assert int8.precision == "int8"
    image = _demo_image(seed=9)
    affine = ck.normalization.fit(image[None])  # type: ignore[attr-defined]
    ref = tiling.segment(image, ck.model, normalize=affine)  # type: ignore[attr-defined]
    assert (tiling.segment(image, int8, normalize=affine) == ref).mean() >= 0.995


def test_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert tiling.resolve_backend("torch", cpu) == "torch"
    assert tiling.resolve_backend("auto", cpu) == ("openvino" if openvino_available() else "torch")
    with pytest.raises(TilingError, match="expected auto, torch or openvino"):
        tiling.resolve_backend("tensorrt", cpu)
    with pytest.raises(TilingError, match="runs on the CPU"):
        tiling.resolve_backend("openvino", torch.device("cuda"))
    with pytest.raises(TilingError, match="int8 runs on the OpenVINO backend"):
        tiling.resolve_precision("int8", cpu, "torch")
    with pytest.raises(TilingError, match="fp16 needs a CUDA device"):
        tiling.resolve_precision("fp16", cpu, "openvino")


def _without_openvino(*args: str) -> subprocess.CompletedProcess[str]:
    """``unet-tile ARGS`` in a process where ``import openvino`` fails, as without the extra."""
    code = "import sys; sys.modules['openvino'] = None; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "UNET_BACKEND": ""}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )


@pytest.mark.slow
def test_without_the_extra_auto_is_torch_and_openvino_is_refused(tmp_path: Path) -> None:
    import tifffile

    src = tmp_path / "in.tif"
    tifffile.imwrite(src, _demo_image(300))
    asked = _without_openvino("segment", str(src), "-o", str(tmp_path / "a.tif"), "--backend", "openvino")
    assert asked.returncode == 2
    assert asked.stderr.strip().splitlines() == [
        "unet-tile: error: the OpenVINO backend needs the 'openvino' package: pip install 'unet-tile[openvino]'"
    ]
    assert not (tmp_path / "a.tif").exists()
    auto = _without_openvino("segment", str(src), "-o", str(tmp_path / "b.tif"), "--precision", "fp32", "-v")
    assert auto.returncode == 0, auto.stderr
    assert "backend torch" in auto.stderr
    assert tifffile.imread(tmp_path / "b.tif").shape == (300, 300)


@needs_openvino
def test_a_model_changed_in_memory_is_converted_again(tmp_path: Path) -> None:
    """The cache is keyed by the weights, not by a file's sha256: calibration and training
    change a loaded model in place, and must not be served its old conversion."""
    model = make_model(seed=5)
    x = np.random.default_rng(1).normal(size=(1, 1, 188, 188)).astype(np.float32)
    before = _ov(model, cache=tmp_path)(x)
    with torch.no_grad():
        model.head.bias[0] += 3.0
    after = _ov(model, cache=tmp_path)(x)
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(after, expected, atol=1e-5)
    assert not np.allclose(before, after)
    assert len(list((tmp_path / "openvino").iterdir())) == 2
