"""The overlap-tile inference loop: plan -> run -> stitch.

:func:`segment` plans the tiles (:mod:`tiling.plan`), reads each input window from the
lazily mirror-padded image (:mod:`tiling.padding`), feeds batches to a :class:`~tiling.predictor.Predictor` (a module, or any callable
``(B, C, h, w) float32 -> (B, K, h - 2m, w - 2m)``), and hands each tile's output to a
sink (:mod:`tiling.sinks`: :func:`segment` uses the in-memory :class:`ArraySink`; the
service streams bands to files through :func:`run`). Reading and normalizing the next batch runs on a worker
thread while the model computes the current one, where that overlaps: when the model
runs on a GPU, or leaves a CPU core free (a predictor says so with its
``overlap_host_work`` property; plain callables get the thread). When the model's
threads take every core, the reader would only steal one of them, and torch's other
threads would wait for it at each operator's barrier, so the next batch is read in line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from torch import nn

from .errors import TilingError
from .padding import read_window
from .plan import Tile, TilePlan, plan_tiles
from .predictor import Predictor, as_predictor
from .sinks import ArraySink, TileSink

__all__ = ["Output", "ProgressCallback", "predict_tiles", "resolve_batch_size", "run", "segment"]

log = logging.getLogger(__name__)

Output = Literal["labels", "probabilities"]
ProgressCallback = Callable[[int, int], None]  # (tiles done, tiles total)
Normalize = Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]]


class _Unset:
    """``segment``'s ``normalize`` not given (``None`` is a choice: already normalized)."""

    def __repr__(self) -> str:
        return "<required>"


_UNSET = _Unset()


def _as_chw(image: Any) -> Any:
    if image.ndim == 2:
        return image[np.newaxis] if isinstance(image, np.ndarray) else np.asarray(image)[np.newaxis]
    if image.ndim == 3:
        return image
    raise TilingError(f"expected a 2-D (H, W) or 3-D (C, H, W) image, got shape {tuple(image.shape)}")


def _float32(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return x.astype(np.float32, copy=False)


def _resolve_depth(predictor: Predictor, model: Any, depth: int | None) -> int:
    config = model.config if isinstance(model, nn.Module) else None
    found = depth or predictor.depth or getattr(config, "depth", None)
    if not isinstance(found, int):
        raise TilingError("cannot tell the network depth: pass depth=... for a plain callable")
    return found


def resolve_batch_size(predictor: Predictor, plan: TilePlan, batch_size: int | None) -> int:
    """``batch_size``, or what the predictor prefers for this plan's windows; at most the tiles."""
    if batch_size is None:
        batch_size = int(predictor.preferred_batch_size(plan.tile_in))
        log.debug("batch size %d for %s input windows", batch_size, plan.tile_in)
    if batch_size < 1:
        raise TilingError(f"batch size must be >= 1, got {batch_size}")
    return min(batch_size, len(plan))


def _batches(tiles: Sequence[Tile], size: int) -> list[Sequence[Tile]]:
    return [tiles[i : i + size] for i in range(0, len(tiles), size)]


def _prefetched(
    image: Any,
    plan: TilePlan,
    batch_size: int,
    normalize: Normalize,
    stage: Callable[[npt.NDArray[np.float32]], Any],
    *,
    threaded: bool = True,
) -> Iterator[tuple[Sequence[Tile], Any]]:
    """Yield (tiles, normalized input batch), preparing the next batch on a worker thread
    (``threaded``) or in line, just before it is needed. ``normalize`` sees the raw
    batches in the plan's order, on one thread."""

    def load(batch: Sequence[Tile]) -> Any:
        return stage(normalize(np.stack([read_window(image, *t.window, offset=plan.margin) for t in batch])))

    batches = _batches(plan.tiles, batch_size)
    if not threaded:
        for batch in batches:
            yield batch, load(batch)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as pool:
        pending = pool.submit(load, batches[0])
        for i, batch in enumerate(batches):
            x = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(load, batches[i + 1])
            yield batch, x


def predict_tiles(
    image: Any,
    plan: TilePlan,
    predictor: Predictor,
    *,
    output: Output = "labels",
    batch_size: int | None = None,
    normalize: Normalize = _float32,
) -> Iterator[tuple[Tile, npt.NDArray[Any]]]:
    """Yield ``(tile, tile_output)`` for every tile of ``plan``, in order.

    ``output="labels"`` runs ``predictor.predict_labels`` ((B, th, tw) class ids),
    ``"probabilities"`` the predictor itself ((B, K, th, tw)); any other shape is refused
    with the shape that was expected. ``batch_size=None`` asks the predictor.
    """
    if output not in ("labels", "probabilities"):
        raise TilingError(f"output must be 'labels' or 'probabilities', got {output!r}")
    batch_size = resolve_batch_size(predictor, plan, batch_size)
    predict = predictor.predict_labels if output == "labels" else predictor
    th, tw = plan.tile_out
    batches = _prefetched(image, plan, batch_size, normalize, predictor.stage, threaded=predictor.overlap_host_work)
    for batch, x in batches:
        y = np.asarray(predict(x))
        if y.ndim != (3 if output == "labels" else 4) or y.shape[0] != len(batch) or y.shape[-2:] != (th, tw):
            expected = (
                f"({len(batch)}, {th}, {tw}) labels" if output == "labels" else f"({len(batch)}, K, {th}, {tw}) scores"
            )
            raise TilingError(
                f"model returned shape {tuple(y.shape)} for a batch of shape {tuple(x.shape)}; expected {expected}"
            )
        yield from zip(batch, y, strict=True)


def run(
    image: Any,
    plan: TilePlan,
    predictor: Predictor,
    sink: TileSink,
    *,
    output: Output = "labels",
    batch_size: int | None = None,
    normalize: Normalize = _float32,
    progress: ProgressCallback | None = None,
) -> Any:
    """Predict every tile of ``plan`` and hand it to ``sink``; returns ``sink.finish()``.

    ``progress(done, total)`` is called after each tile; raising from it stops the run.
    """
    for done, (tile, y) in enumerate(
        predict_tiles(image, plan, predictor, output=output, batch_size=batch_size, normalize=normalize), 1
    ):
        sink.add(tile, y)
        if progress is not None:
            progress(done, len(plan))
    return sink.finish()


def segment(
    image: Any,
    model: Any,
    *,
    output: Output = "labels",
    tile_size: int | tuple[int, int] = 388,
    stride: int | tuple[int, int] | None = None,
    batch_size: int | None = None,
    normalize: Normalize | _Unset | None = _UNSET,
    depth: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
    progress: ProgressCallback | None = None,
) -> npt.NDArray[Any]:
    """Segment a 2-D image of any size with the overlap-tile strategy.

    ``image``: (H, W) or (C, H, W), any numeric dtype, or an array-like (memmap, zarr).
    ``model``: an ``nn.Module`` (wrapped in :class:`~tiling.predictor.TorchPredictor` on
    ``device`` at ``precision``) or any callable mapping a (B, C, h, w) float32 batch to
    (B, K, h - 2m, w - 2m) scores; ``depth`` is read from ``model.config`` when not given.
    ``normalize`` (required): maps each raw (B, C, h, w) batch to float32, fitted once per
    image so every tile is treated alike: for a checkpoint, ``ck.normalization.fit(image)``;
    ``None`` for an image that is already normalized (a plain float32 cast). Without it the
    call is refused: raw camera counts fed to a network trained on normalized inputs give a
    wrong mask without any error. (:func:`unet_tile.load` and ``Model.segment`` apply the
    checkpoint's normalization themselves.)
    ``batch_size``: tiles read and predicted together; ``None`` lets a
    :class:`~tiling.predictor.TorchPredictor` choose for its device (cache-sized on the
    CPU, from free memory on CUDA), 4 for other callables. It never changes the result.

    Returns (H, W) uint8 class ids for ``output="labels"`` (argmax per tile: no full-size
    score buffer) or (K, H, W) float32 scores (probabilities for a module).

    >>> crop = lambda x: x[:, :, 92:-92, 92:-92]  # the "identity" valid network
    >>> img = np.arange(35, dtype=np.float32).reshape(5, 7)
    >>> bool((segment(img, crop, output="probabilities", depth=4, normalize=None)[0] == img).all())
    True
    """
    if isinstance(normalize, _Unset):
        raise TilingError(
            "pass normalize=: the checkpoint's normalization fitted on this image (ck.normalization.fit(image)),"
            " or None if the image is already normalized; or use unet_tile.load(...).segment(image), which applies it"
        )
    if output not in ("labels", "probabilities"):
        raise TilingError(f"output must be 'labels' or 'probabilities', got {output!r}")
    image = _as_chw(image)
    predictor = as_predictor(model, depth=depth, device=device, precision=precision)
    plan = plan_tiles(
        image.shape[-2:], depth=_resolve_depth(predictor, model, depth), tile_size=tile_size, stride=stride
    )
    log.debug("%d tiles of %s for an image of %s", len(plan), plan.tile_out, image.shape)
    sink = ArraySink(plan.image_shape, np.uint8 if output == "labels" else np.float32)
    result: npt.NDArray[Any] = run(
        image,
        plan,
        predictor,
        sink,
        output=output,
        batch_size=batch_size,
        normalize=normalize or _float32,
        progress=progress,
    )
    return result
