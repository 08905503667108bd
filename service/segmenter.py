"""A loaded checkpoint ready to segment images: its model as a predictor, its normalization,
the channel check and the no-data class.

:mod:`unet` gives the model and its normalization, :mod:`tiling` the predictor; the
pipeline (:mod:`service.pipeline`) runs them over sources and sinks, for the CLI, the HTTP
app and the jobs alike, so a file gives the same mask through any of them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from tiling import TorchPredictor, build_predictor
from tiling.openvino import OpenVINOPredictor
from unet import Checkpoint, geometry
from unet.synth import synth_set

from .errors import UnsupportedImageError
from .io import ImageHeader
from .paths import cache_dir

__all__ = ["ExecutorPredictor", "Segmenter", "calibration_windows"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_CALIBRATION_SEED = 4242  # unet.synth images no training, calibration or held-out set uses
_CALIBRATION_WINDOWS = 24  # ~7 s to quantize the demo model; its int8 figures: docs/performance.md


def calibration_windows(checkpoint: Checkpoint, n: int = _CALIBRATION_WINDOWS) -> list[npt.NDArray[np.float32]]:
    """``n`` normalized 572x572 windows of synthetic demo images (``unet.synth``) for int8
    calibration: the nuclei the demo model was trained on, normalized as the checkpoint says
    (a multi-channel model gets the image in every channel: fit for nuclei models only)."""
    size = geometry.input_size(388, checkpoint.config.depth)
    windows = []
    for sample in synth_set(n, seed=_CALIBRATION_SEED, shape=(size, size)):
        image = np.repeat(sample.image[None], checkpoint.config.in_channels, axis=0)
        windows.append(checkpoint.normalization.fit(image)(image)[None].astype(np.float32))
    return windows


class ExecutorPredictor:
    """A :class:`~tiling.Predictor` whose forward passes run on ``executor``'s threads.

    The caller's thread keeps the host work (reading and normalizing windows, stitching,
    writing); only the model calls hop over. The server gives this to its job worker so
    that every forward pass happens on the segmentation thread: torch's CPU thread pool is
    per calling thread, and a second pool made each pass ~8 % slower here even while idle
    (and two busy ones oversubscribe the cores). A ``/segment`` request queued meanwhile
    waits for one batch of a job, not for the whole job.
    """

    def __init__(self, predictor: TorchPredictor | OpenVINOPredictor, executor: Executor) -> None:
        self.inner = predictor
        self.executor = executor

    @property
    def depth(self) -> int | None:
        return self.inner.depth

    def _on_executor(self, fn: Callable[..., _T], *args: Any) -> _T:
        return self.executor.submit(fn, *args).result()

    def __call__(self, x: npt.NDArray[np.float32] | Any) -> npt.NDArray[np.float32]:
        return self._on_executor(self.inner, x)

    def predict_labels(self, x: npt.NDArray[np.float32] | Any) -> npt.NDArray[np.uint8]:
        return self._on_executor(self.inner.predict_labels, x)

    def preferred_batch_size(self, tile_in: tuple[int, int]) -> int:
        return self._on_executor(self.inner.preferred_batch_size, tile_in)  # on CUDA it runs a probe pass

    def stage(self, x: npt.NDArray[np.float32]) -> Any:
        return self.inner.stage(x)  # host work: stays on the caller's (reader) thread

    @property
    def overlap_host_work(self) -> bool:
        return self.inner.overlap_host_work

    @property
    def device(self) -> Any:
        return self.inner.device

    @property
    def precision(self) -> str:
        return self.inner.precision

    @property
    def backend(self) -> str:
        return self.inner.backend

    def __repr__(self) -> str:
        return f"ExecutorPredictor({self.inner!r})"


class Segmenter:
    """Segments (planes, C, Y, X) images with one checkpoint on one device.

    The pipeline (:mod:`service.pipeline`) runs it over sources and sinks; NaN (no-data)
    pixels get :attr:`background`.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int | None = None,
        backend: str = "auto",
        cache: Path | None = None,
    ) -> None:
        from .instances import instance_rule  # noqa: PLC0415  (instances import the sinks, which import this)

        instance_rule(checkpoint)  # a checkpoint with an invalid instance rule is refused at load, not at use
        self.checkpoint = checkpoint
        self.predictor: TorchPredictor | OpenVINOPredictor | ExecutorPredictor = build_predictor(
            checkpoint.model,
            backend=backend,
            device=device,
            precision=precision,
            cache_dir=cache or cache_dir(),
            calibration=lambda: calibration_windows(checkpoint),
        )
        self.batch_size = batch_size

    def running_on(self, executor: Executor) -> Segmenter:
        """A segmenter sharing this one's model whose forward passes run on ``executor``
        (see :class:`ExecutorPredictor`)."""
        twin = copy.copy(self)
        inner = self.predictor.inner if isinstance(self.predictor, ExecutorPredictor) else self.predictor
        twin.predictor = ExecutorPredictor(inner, executor)
        return twin

    @property
    def depth(self) -> int:
        return self.checkpoint.config.depth

    @property
    def background(self) -> int:
        """The class of NaN (no-data) pixels: the first class that is not foreground (else 0)."""
        foreground = set(self.checkpoint.foreground)
        return next((k for k in range(self.checkpoint.config.num_classes) if k not in foreground), 0)

    def check(self, header: ImageHeader) -> None:
        """Refuse an image whose channel count does not match the model."""
        expected = self.checkpoint.config.in_channels
        if header.channels != expected:
            hint = ""
            if header.axes.startswith("S") and expected == 1:
                hint = "; if these are planes, not channels, save the file with axes metadata"
            raise UnsupportedImageError(
                f"model expects {expected} channel(s), image has {header.channels} "
                f"(axes {header.axes!r} of shape {header.shape}{hint})"
            )

    def warmup(self) -> None:
        """One forward pass on a blank tile (allocators, kernels, autotuning)."""
        n = geometry.input_size(4, self.depth)
        blank = np.zeros((1, self.checkpoint.config.in_channels, n, n), np.float32)
        self.predictor.predict_labels(blank)

    def describe(self) -> dict[str, Any]:
        ck = self.checkpoint
        return {
            "config": ck.config.to_dict(),
            "class_names": list(ck.class_names),
            "foreground": list(ck.foreground),
            "normalization": ck.normalization.to_dict(),
            "sha256": ck.sha256,
            "format_version": ck.format_version,
            "device": str(self.predictor.device),
            "precision": self.predictor.precision,
            "backend": self.predictor.backend,
            # the object diameters (px) it segments as they are; others are rescaled to "native"
            "size": ck.size.to_dict() if ck.size is not None else None,
            "tile": {
                "output": 388,
                "input": geometry.input_size(388, self.depth),
                "margin": geometry.context_margin(self.depth),
                "period": geometry.pooling_period(self.depth),
            },
            "info": ck.info,
        }
