"""The benchmark's inputs: a synthetic nuclei image of any size and the checkpoint to run.

The image is the demo data (:func:`unet.synth.synth_image`, the generator the demo model
was trained on) when that module is present: one 1024x1024 sample tiled to the requested
size, so every size is generated in seconds. Without it, a simpler blob image.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

import unet
from unet.checkpoint import DEMO_CHECKPOINT

__all__ = ["DEMO_SEEDS", "bench_image", "demo_samples", "resolve_checkpoint"]

log = logging.getLogger(__name__)

DEMO_SEEDS = (1001, 1002, 1003, 1004)  # held-out seeds: never the demo model's training seeds
_FALLBACK_WIDTH = 16


def _blobs(rng: np.random.Generator, shape: tuple[int, int]) -> npt.NDArray[np.uint16]:
    """Gaussian 'nuclei' on a gradient background with Poisson-like noise (no unet.synth)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 200 + 100 * (xx / max(w, 1))
    for _ in range(max(1, h * w // 1500)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 14)
        y0, y1, x0, x1 = (
            int(max(0, cy - 3 * r)),
            int(min(h, cy + 3 * r)),
            int(max(0, cx - 3 * r)),
            int(min(w, cx + 3 * r)),
        )
        sub = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2
        img[y0:y1, x0:x1] += rng.uniform(300, 3000) * np.exp(-sub / (2 * r * r))
    img += rng.normal(0, 20, size=shape).astype(np.float32)
    out: npt.NDArray[np.uint16] = np.clip(img, 0, 65535).astype(np.uint16)
    return out


def _sample(seed: int, shape: tuple[int, int]) -> npt.NDArray[Any]:
    try:
        synth = importlib.import_module("unet.synth")
    except ImportError:
        return _blobs(np.random.default_rng(seed), shape)
    image: npt.NDArray[Any] = synth.synth_image(np.random.default_rng(seed), shape, dtype="uint16").image
    return image


def bench_image(size: int, seed: int = 7) -> npt.NDArray[Any]:
    """A (size, size) uint16 image: one demo sample of up to 1024x1024, tiled."""
    block = _sample(seed, (min(size, 1024), min(size, 1024)))
    reps = -(-size // block.shape[0])
    return np.ascontiguousarray(np.tile(block, (reps, reps))[:size, :size])


def demo_samples(size: int = 1024) -> list[npt.NDArray[Any]]:
    """Held-out demo images for the precision agreement check."""
    return [_sample(seed, (size, size)) for seed in DEMO_SEEDS]


def resolve_checkpoint(requested: Path | None, workdir: Path) -> tuple[Path, str]:
    """(checkpoint path, note): the requested one, else the demo one, else a random
    width-16 stand-in saved under ``workdir`` (timings then hold; agreement does not)."""
    if requested is not None:
        return requested, ""
    if DEMO_CHECKPOINT.is_file():
        return DEMO_CHECKPOINT, ""
    path = workdir / "random-width16.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = unet.UNet(unet.UNetConfig(base_width=_FALLBACK_WIDTH)).eval()
        unet.save_checkpoint(path, model, class_names=["background", "nucleus"])
    note = (
        f"demo checkpoint {DEMO_CHECKPOINT} not found: using a RANDOM base_width-{_FALLBACK_WIDTH} "
        "checkpoint (speed and memory are representative; precision agreement is not)"
    )
    log.warning("%s", note)
    return path, note
