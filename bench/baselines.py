"""What users write instead of the engine, with the same weights (naive) or width (MONAI).

:func:`naive_segment` is the obvious loop: fp32, NCHW, one 572x572 tile at a time on the
paper's 388-px grid, ``np.pad`` (reflect) per tile, a forward pass and an argmax per tile.
:func:`monai_segment` is MONAI's ``sliding_window_inference`` with its same-padding
``BasicUNet`` (roi 572, overlap 0.25, Gaussian blending): the usual alternative.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["monai_available", "monai_segment", "naive_segment"]


def naive_segment(
    image: npt.NDArray[Any],
    model: nn.Module,
    normalize: Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]],
    *,
    margin: int = 92,
    tile: int = 388,
    device: str = "cpu",
) -> npt.NDArray[np.uint8]:
    """(H, W) labels, one tile at a time, the way most first versions are written."""
    h, w = image.shape
    model = model.eval().to(device)
    out = np.zeros((h, w), np.uint8)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, y1, x0, x1 = y - margin, y + tile + margin, x - margin, x + tile + margin
            window = image[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
            pad = ((max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w)))
            window = np.pad(window, pad, mode="reflect")
            x_in = torch.from_numpy(normalize(window[None, None]))
            with torch.no_grad():
                logits = model(x_in.to(device))
            labels = logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
            out[y : y + tile, x : x + tile] = labels[: min(tile, h - y), : min(tile, w - x)]
    return out


def monai_available() -> bool:
    return importlib.util.find_spec("monai") is not None


def monai_segment(
    image: npt.NDArray[Any],
    width: int,
    normalize: Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]],
    *,
    num_classes: int = 2,
    device: str = "cpu",
    sw_batch_size: int = 4,
    precision: str = "fp32",
) -> npt.NDArray[np.uint8]:
    """(H, W) labels from MONAI's sliding window over a same-padding U-Net of ``width``.

    ``precision`` bf16/fp16 runs the network under autocast (MONAI's own default is fp32).
    """
    sliding_window_inference = importlib.import_module("monai.inferers").sliding_window_inference
    basic_unet = importlib.import_module("monai.networks.nets").BasicUNet

    torch.manual_seed(0)
    features = (width, 2 * width, 4 * width, 8 * width, 16 * width, width)
    net = basic_unet(spatial_dims=2, in_channels=1, out_channels=num_classes, features=features).eval().to(device)
    x = torch.from_numpy(normalize(image[None, None])).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.no_grad(), autocast:
        logits = sliding_window_inference(
            x, roi_size=(572, 572), sw_batch_size=sw_batch_size, predictor=net, overlap=0.25, mode="gaussian"
        )
    assert isinstance(logits, torch.Tensor)
    return logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
