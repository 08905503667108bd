"""The CUDA path of the engine: the same masks as the CPU, reduced precision, batch sizing.

Skipped where no CUDA device is present (CI); run on a GPU host with ``pytest tests/tiling/test_cuda.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

import tiling
import unet
from tests.conftest import balance_classes, make_model
from unet.synth import synth_set

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture
def _no_tf32() -> Iterator[None]:
    """cuDNN may run fp32 convolutions in TF32 (10-bit mantissa); exact fp32 needs it off."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.usefixtures("_no_tf32")
def test_cuda_fp32_masks_match_the_cpu() -> None:
    img = _image((700, 900))
    model = balance_classes(make_model(base_width=8), torch.from_numpy(img[None, None, :572, :572]))
    cpu = tiling.segment(img, model, device="cpu", normalize=None)
    gpu = tiling.segment(img, model, device="cuda", precision="fp32", normalize=None)
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    # every pixel of this random model sits near the class boundary: only exact ties may differ
    assert np.mean(gpu == cpu) >= 0.9999


def test_reduced_precision_on_cuda_keeps_the_demo_models_masks() -> None:
    """``auto``'s criterion on the GPU: >= 99.9 % label agreement with fp32 on nuclei images."""
    ck = unet.load_checkpoint(unet.checkpoint.DEMO_CHECKPOINT)
    for sample in synth_set(2, seed=4242, shape=(600, 700)):
        affine = ck.normalization.fit(sample.image[np.newaxis])
        ref = tiling.segment(sample.image, ck.model, normalize=affine, device="cpu")
        for precision in ("bf16", "fp16"):
            got = tiling.segment(sample.image, ck.model, normalize=affine, device="cuda", precision=precision)
            assert np.mean(got == ref) >= 0.999, precision


def test_auto_precision_and_batch_size_on_cuda() -> None:
    predictor = tiling.TorchPredictor(make_model(base_width=8), device="cuda", precision="auto")
    assert predictor.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert predictor.overlap_host_work
    fp32 = tiling.TorchPredictor(make_model(base_width=8), device="cuda", precision="fp32")
    # a width-8 tile needs a few hundred MB at most: any real card holds many per pass
    assert predictor.preferred_batch_size((572, 572)) > 4
    assert fp32.preferred_batch_size((572, 572)) > 4


def test_pinned_batches_give_the_same_labels_as_plain_ones() -> None:
    predictor = tiling.TorchPredictor(make_model(base_width=4), device="cuda")
    x = _image((3, 572, 572))[:, None]
    staged = predictor.stage(x)
    assert staged.is_pinned()
    assert np.array_equal(predictor.predict_labels(staged), predictor.predict_labels(x))
