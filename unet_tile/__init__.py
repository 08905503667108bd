"""unet-tile in one call: load a checkpoint, segment an array with its own preprocessing.

>>> import numpy as np
>>> import unet_tile
>>> model = unet_tile.load("demo", precision="fp32")  # the bundled nucleus model
>>> image = np.random.default_rng(0).integers(0, 4000, (300, 420)).astype(np.uint16)
>>> labels = model.segment(image)  # the checkpoint's normalization, fitted on this image
>>> labels.shape, labels.dtype.name
((300, 420), 'uint8')
>>> model.segment(image, output="probabilities", tile_size=196).shape  # (classes, Y, X)
(3, 300, 420)
>>> model.segment(image, output="instances").dtype.name  # 0 = background, 1..N objects
'uint32'

What :meth:`Model.segment` computes is what ``unet-tile segment`` and ``POST /segment`` write
for the same pixels: the same pipeline (:func:`service.pipeline.segment`), with the
normalization fitted once on the image, the seam-free tile plan, and for instances the
checkpoint's rule. Arrays: numpy, or any array-like with ``shape``, ``dtype`` and slicing
(zarr, dask), read window by window; the result is held in memory. For files larger than
memory use :func:`service.pipeline.segment_file` or the CLI, which stream the result too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy.typing as npt

from service.errors import InputError
from service.pipeline import Options, Route, open_sink, resolve
from service.pipeline import segment as _segment
from service.scale import parse_diameter
from service.segmenter import Segmenter
from service.sinks import MemorySink, Sink
from service.sources import ArraySource
from unet import Checkpoint, load_checkpoint
from unet.checkpoint import DEMO_CHECKPOINT

__all__ = ["Model", "load"]

Output = Literal["labels", "probabilities", "instances"]


def load(
    checkpoint: str | Path = "demo",
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    backend: str = "auto",
) -> Model:
    """A model ready to segment: ``"demo"`` (the bundled one) or a checkpoint file.

    ``precision``: ``auto`` (bf16 where the CPU/GPU has native bf16, else fp32), ``fp32``
    (exact seam-free tiling), ``bf16``, ``fp16`` (CUDA), ``int8`` (OpenVINO); ``device``: ``auto``,
    ``cpu``, ``cuda``; ``backend``: ``auto`` (OpenVINO on the CPU where installed), ``torch``, ``openvino``.
    """
    path = DEMO_CHECKPOINT if str(checkpoint) == "demo" else Path(checkpoint)
    ck = load_checkpoint(path)
    return Model(ck, device=device, batch_size=batch_size, precision=precision, backend=backend)


@dataclass
class Model:
    """A checkpoint and the device it runs on; :meth:`segment` any number of images."""

    checkpoint: Checkpoint
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    backend: str = "auto"
    _segmenters: dict[str, Segmenter] = field(default_factory=dict, repr=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.checkpoint.class_names)

    def _segmenter(self, precision: str) -> Segmenter:
        if precision not in self._segmenters:
            self._segmenters[precision] = Segmenter(
                self.checkpoint,
                device=self.device,
                precision=precision,
                batch_size=self.batch_size,
                backend=self.backend,
            )
        return self._segmenters[precision]

    def segment(
        self,
        image: Any,
        *,
        output: Output = "labels",
        tile_size: int = 388,
        axes: str | None = None,
        min_area: int | None = None,
        precision: str | None = None,
        diameter: float | str = "auto",
        pixel_size: float | None = None,
        fill_holes: bool = True,
    ) -> npt.NDArray[Any]:
        """The mask of ``image``: (Y, X) uint8 class ids, (K, Y, X) float32 probabilities or
        (Y, X) uint32 instances; a stack (``axes`` with Z, T, ...) gets its stack axes first.

        ``axes``: e.g. ``"YX"``, ``"CYX"``, ``"YXC"``, ``"ZYX"``; by default ``YX`` for 2-D, and
        for 3-D the axis whose length is the model's channel count as C (first, else last).
        ``precision``: this call's, else the model's. ``min_area``: instances' smallest object
        (default: the checkpoint's). ``diameter``: the objects' size in px, ``"auto"`` (measured;
        rescaled only outside the model's range) or ``"off"``; ``pixel_size``: µm per px instead
        (see docs/scale.md). ``fill_holes``: labels without holes inside objects.
        """
        segmenter = self._segmenter(precision or self.precision)
        source = ArraySource(image, axes or _axes(tuple(image.shape), self.checkpoint.config.in_channels))
        header = source.header
        options = Options(
            output=output,
            tile_size=tile_size,
            min_area=min_area,
            diameter=parse_diameter(diameter),
            pixel_size=pixel_size,
            fill_holes=fill_holes,
        )
        options = resolve(segmenter, source, options)
        memory = MemorySink(header, output, self.checkpoint.config.num_classes)
        sink: Sink = memory
        if output == "instances" or (output == "labels" and fill_holes):
            sink = open_sink(Route("decoded", "memory"), None, header, segmenter, options, source=source)
            memory = sink.inner  # type: ignore[attr-defined]
        _segment(segmenter, source, sink, options)
        result = memory.result
        return result.reshape(*header.stack_shape, *result.shape[1:]) if header.stack_axes else result[0]


def _axes(shape: tuple[int, ...], channels: int) -> str:
    """The axes of an array the caller did not name.

    >>> _axes((300, 400), 1), _axes((3, 300, 400), 3), _axes((300, 400, 3), 3), _axes((5, 300, 400), 1)
    ('YX', 'CYX', 'YXC', 'ZYX')
    """
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        if channels > 1 and shape[0] == channels:
            return "CYX"
        if channels > 1 and shape[-1] == channels:
            return "YXC"
        if channels == 1:
            return "ZYX"
    raise InputError(f"cannot tell the axes of an array of shape {shape}: pass axes= (e.g. 'CYX', 'ZYX')")
