"""Fixtures shared by the whole suite: small real models and checkpoints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import unet


def make_model(*, in_channels: int = 1, num_classes: int = 2, base_width: int = 4, seed: int = 0) -> unet.UNet:
    """A small randomly initialised U-Net with non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    model = unet.UNet(unet.UNetConfig(in_channels=in_channels, num_classes=num_classes, base_width=base_width))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def balance_classes(model: unet.UNet, x: torch.Tensor) -> unet.UNet:
    """Shift the head bias so ``model`` splits ``x`` (B, C, H, W) into both classes evenly.

    A freshly initialised network predicts one class everywhere; masks compared between
    two paths should have something in them.
    """
    with torch.no_grad():
        logits = model(x)
        model.head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return model


@pytest.fixture(scope="session", autouse=True)
def _conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The OpenVINO backend's converted networks go to one folder of this run (servers and
    CLI runs started by tests inherit it), not to the user's ``~/.cache``."""
    before = os.environ.get("UNET_CACHE_DIR")
    os.environ["UNET_CACHE_DIR"] = str(tmp_path_factory.mktemp("unet-cache"))
    yield
    if before is None:
        os.environ.pop("UNET_CACHE_DIR", None)
    else:
        os.environ["UNET_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def readme() -> str:
    """The project's README, which some tests hold to what the code does."""
    return (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint file: 1 input channel, 2 classes, base width 4."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    unet.save_checkpoint(path, make_model(), class_names=["background", "nucleus"])
    return path


@pytest.fixture(scope="session")
def tiny_rgb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint file for 3-channel images."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-rgb.safetensors"
    unet.save_checkpoint(path, make_model(in_channels=3, seed=1))
    return path
