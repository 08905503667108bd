"""Adapters from a PyTorch module to the engine's callable: (B, C, h, w) -> (B, K, h', w').

The engine accepts any callable on numpy batches. :class:`TorchPredictor` wraps an
``nn.Module`` (any valid-padding network) with eval mode, ``inference_mode``,
channels-last memory layout and optional reduced-precision autocast, and offers a
``predict_labels`` fast path that takes the argmax on the device.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from .errors import TilingError

__all__ = ["Precision", "TorchPredictor", "resolve_device", "resolve_precision"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; refuse a device that is absent."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TilingError("device 'cuda' requested but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise TilingError(f"unsupported device {str(device)!r}; expected auto, cpu or cuda")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision actually used: ``auto`` is bf16 on CUDA GPUs that support it, else fp32."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise TilingError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16")
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TilingError("fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    return precision


class TorchPredictor:
    """Run a valid-padding ``nn.Module`` on numpy tile batches."""

    def __init__(
        self,
        module: nn.Module,
        *,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        channels_last: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        self.module = module.eval().to(self.device)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        config = getattr(module, "config", None)
        self.depth: int | None = getattr(config, "depth", None)

    def _logits(self, x: npt.NDArray[np.float32]) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        dtype = _DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out: torch.Tensor = self.module(t)
        return out.float()

    @torch.inference_mode()
    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Per-class probabilities (softmax over the class axis)."""
        return torch.softmax(self._logits(x), dim=1).cpu().numpy()

    @torch.inference_mode()
    def predict_labels(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
        """Class ids (argmax), computed on the device; only uint8 crosses back."""
        return self._logits(x).argmax(dim=1).to(torch.uint8).cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchPredictor(device={self.device}, precision={self.precision})"


def as_predictor(model: Any, **kwargs: Any) -> Any:
    """A module becomes a :class:`TorchPredictor`; any other callable passes through."""
    if isinstance(model, nn.Module):
        return TorchPredictor(model, **kwargs)
    if not callable(model):
        raise TilingError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    return model
