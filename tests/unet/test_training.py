"""Training: loss goes down, runs are deterministic and resumable, checkpoints round-trip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import tiling
import unet
from unet import Normalization, UNet, UNetConfig, UNetError
from unet.losses import soft_dice_loss, weighted_cross_entropy
from unet.synth import synth_set
from unet.training import TrainConfig, TrainingData, prepare_data, sample_batch, train

PATCH = 220  # valid for depth 4: output 36


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and far faster than two on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> TrainingData:
    samples = synth_set(4, seed=0, shape=(96, 96))
    return prepare_data([s.image for s in samples], [s.labels for s in samples], Normalization())


def _model(seed: int = 0, width: int = 4) -> UNet:
    torch.manual_seed(seed)
    return UNet(UNetConfig(base_width=width))


def _eval_loss(model: UNet, data: TrainingData) -> float:
    x, y, w = sample_batch(data, np.random.default_rng(123), TrainConfig(batch_size=4, patch_size=PATCH), 4)
    model.eval()
    with torch.no_grad():
        return float(weighted_cross_entropy(model(x), y, w))


def test_batches_are_valid_size_patches_with_cropped_targets(data: TrainingData) -> None:
    x, y, w = sample_batch(data, np.random.default_rng(0), TrainConfig(batch_size=3, patch_size=PATCH), 4)
    assert x.shape == (3, 1, PATCH, PATCH) and x.dtype == torch.float32
    out = unet.geometry.output_size(PATCH, 4)
    assert y.shape == w.shape == (3, out, out) and y.dtype == torch.int64
    assert set(y.unique().tolist()) <= {0, 1} and float(w.min()) > 0


def test_a_few_steps_reduce_the_loss(data: TrainingData) -> None:
    model = _model()
    before = _eval_loss(model, data)
    result = train(model, data, TrainConfig(steps=25, batch_size=2, patch_size=PATCH, lr=3e-3, warmup=3))
    assert len(result.losses) == 25
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert _eval_loss(result.model, data) < before


def test_three_class_training_learns_the_boundary_class() -> None:
    samples = synth_set(4, seed=0, shape=(96, 96))
    data3 = prepare_data([s.image for s in samples], [s.labels for s in samples], Normalization(), num_classes=3)
    assert all(np.array_equal(t > 0, s.labels > 0) for t, s in zip(data3.targets, samples, strict=True))
    assert any((t == 2).any() for t in data3.targets)  # the synthetic nuclei touch
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_width=4, num_classes=3))
    _, y, _ = sample_batch(data3, np.random.default_rng(5), TrainConfig(batch_size=4, patch_size=PATCH), 4)
    assert set(y.unique().tolist()) <= {0, 1, 2}
    result = train(model, data3, TrainConfig(steps=25, batch_size=2, patch_size=PATCH, lr=3e-3, warmup=3))
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    with pytest.raises(UNetError, match="the data has class 2"):
        train(UNet(UNetConfig(base_width=2)), data3, TrainConfig(steps=1, patch_size=PATCH))
    with pytest.raises(UNetError, match=r"2 classes .* or 3"):
        prepare_data([samples[0].image], [samples[0].labels], Normalization(), num_classes=4)


def test_runs_are_deterministic_and_resume_exactly(data: TrainingData, tmp_path: Path) -> None:
    config = TrainConfig(steps=4, batch_size=1, patch_size=PATCH, save_every=2, seed=3)
    straight = train(_model(), data, config)

    class StopError(Exception):
        pass

    def stop_after_two(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise StopError

    state = tmp_path / "run.state.pt"
    with pytest.raises(StopError):
        train(_model(), data, config, state_path=state, progress=stop_after_two)
    assert state.is_file()
    resumed = train(_model(seed=99), data, config, state_path=state, resume=True)
    assert resumed.losses == straight.losses
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_loader_threads_and_the_dice_term_keep_runs_deterministic(data: TrainingData) -> None:
    """Batches cut ahead on threads are the batches cut in line; the Dice term trains too."""
    config = TrainConfig(steps=6, batch_size=2, patch_size=PATCH, seed=1, dice=1.0, lr=3e-3, warmup=2)
    inline = train(_model(), data, config)
    ahead = train(_model(), data, config, loader_threads=2)
    assert ahead.losses == inline.losses
    for (k, a), b in zip(inline.model.state_dict().items(), ahead.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    plain = train(_model(), data, TrainConfig(steps=6, batch_size=2, patch_size=PATCH, seed=1, lr=3e-3, warmup=2))
    assert plain.losses[0] < inline.losses[0]  # same first batch and weights: the Dice term adds to the loss
    with pytest.raises(UNetError, match="dice must be >= 0"):
        TrainConfig(dice=-1.0)


def test_soft_dice_loss_scores_overlap() -> None:
    target = torch.tensor([[[0, 1, 2, 0]]])  # classes 1 and 2 are both foreground
    sure = torch.tensor([[9.0, -9.0, -9.0, 9.0], [-9.0, 9.0, 9.0, -9.0]]).reshape(1, 2, 1, 4)  # (B, K, h, w)
    assert float(soft_dice_loss(sure, target)) < 1e-3
    half = torch.zeros(1, 2, 1, 4)  # p(fg) = 0.5 everywhere: Dice = 2*1 / (2 + 2) (+1 smoothing)
    assert float(soft_dice_loss(half, target)) == pytest.approx(1 - 3 / 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_returns_a_cpu_model_that_learned(data: TrainingData) -> None:
    result = train(
        _model(), data, TrainConfig(steps=25, batch_size=2, patch_size=PATCH, lr=3e-3, warmup=3), device="cuda"
    )
    assert next(result.model.parameters()).device.type == "cpu"
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])


def test_resume_refuses_another_configuration(data: TrainingData, tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    train(_model(), data, TrainConfig(steps=1, batch_size=1, patch_size=PATCH), state_path=state)
    with pytest.raises(UNetError, match="another model, configuration or data set"):
        train(_model(), data, TrainConfig(steps=2, batch_size=1, patch_size=PATCH), state_path=state, resume=True)
    with pytest.raises(UNetError, match="no training state"):
        train(_model(), data, TrainConfig(steps=1, patch_size=PATCH), state_path=tmp_path / "none.pt", resume=True)


def test_invalid_patch_size_is_refused(data: TrainingData) -> None:
    with pytest.raises(unet.GeometryError, match="nearest valid sizes: 204 or 220"):
        train(_model(), data, TrainConfig(steps=1, patch_size=210))


def test_train_save_load_segment_round_trip(data: TrainingData, tmp_path: Path) -> None:
    result = train(_model(width=2), data, TrainConfig(steps=3, batch_size=1, patch_size=PATCH))
    path = tmp_path / "m.safetensors"
    norm = Normalization()
    unet.save_checkpoint(
        path, result.model, normalization=norm, class_names=["background", "nucleus"], info={"seed": 0}
    )
    ck = unet.load_checkpoint(path)
    assert ck.normalization == norm and ck.class_names == ("background", "nucleus") and ck.info == {"seed": 0}
    image = synth_set(1, seed=9, shape=(70, 90))[0].image
    affine = norm.fit(image[np.newaxis])
    loaded = tiling.segment(image, ck.model, normalize=affine, output="probabilities")
    trained = tiling.segment(image, result.model, normalize=affine, output="probabilities")
    assert loaded.shape == (2, 70, 90)
    assert np.allclose(loaded, trained, atol=1e-5)


def _otsu(image: np.ndarray) -> float:
    hist, edges = np.histogram(image.astype(np.float64), bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0, m1 = s0 / np.maximum(w0, 1), (s0[-1] - s0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 0
    return float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))


def test_bundled_demo_checkpoint_is_what_the_readme_says_and_beats_otsu(readme: str) -> None:
    ck = unet.load_checkpoint(unet.checkpoint.DEMO_CHECKPOINT)
    assert ck.config == UNetConfig(in_channels=1, num_classes=3, depth=4, base_width=16, batch_norm=True)
    assert ck.class_names == ("background", "nucleus", "boundary") and ck.foreground == (1, 2)
    assert ck.normalization == Normalization(method="percentile", low=1.0, high=99.8)
    assert ck.info["seed"] == 0 and ck.info["command"].startswith("unet-tile train ")
    assert ck.info["held_out"]["dice"] >= 0.94 and "--classes 3" in ck.info["command"]
    assert "background_logit_offset" in ck.info["calibration"]
    # instances: its rule recorded, the minimum area the one calibration chose; a 4-px boundary target
    assert ck.instances == {"seeds": [1], "grow": [2], "min_area": ck.info["calibration"]["min_area"], "grow_px": 4,
                            "fill_holes": True}  # fmt: skip
    assert "--boundary-width 4" in ck.info["command"] and ck.info["held_out"]["f1"] >= 0.9
    assert unet.checkpoint.file_sha256(unet.checkpoint.DEMO_CHECKPOINT) in readme  # the README names this file
    assert f"--steps {ck.info['steps']} " in readme and f"--n {ck.info['data']['planes']} --seed 1" in readme
    samples = synth_set(4, seed=2027, shape=(160, 160))  # never trained on (training used seed 1)
    model_dice, otsu_dice = [], []
    for s in samples:
        labels = tiling.segment(s.image, ck.model, normalize=ck.normalization.fit(s.image[np.newaxis]))
        model_dice.append(_dice(np.isin(labels, ck.foreground), s.labels))
        otsu_dice.append(_dice(s.image > _otsu(s.image), s.labels))
    assert np.mean(model_dice) > 0.85
    assert np.mean(model_dice) > np.mean(otsu_dice) + 0.1
