"""The overlap-tile inference loop: plan -> run -> stitch.

:func:`segment` plans the tiles (:mod:`tiling.plan`), reads each input window from the
lazily mirror-padded image (:mod:`tiling.padding`), feeds batches to any callable
``(B, C, h, w) float32 -> (B, K, h - 2m, w - 2m)``, and writes each tile's kept part into
the output with one assignment. Reading and normalizing the next batch runs on a worker
thread while the model computes the current one, where that overlaps: when the model
runs on a GPU, or leaves a CPU core free (a predictor says so with its
``overlap_host_work`` attribute; plain callables get the thread). When the model's
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

from .errors import TilingError
from .padding import read_window
from .plan import Tile, TilePlan, plan_tiles
from .predictor import as_predictor

__all__ = ["Output", "ProgressCallback", "predict_tiles", "segment"]

log = logging.getLogger(__name__)

Output = Literal["labels", "probabilities"]
ProgressCallback = Callable[[int, int], None]  # (tiles done, tiles total)
Normalize = Callable[[npt.NDArray[Any]], npt.NDArray[np.float32]]
_DEFAULT_BATCH = 4  # for plain callables that do not say what suits them


def _as_chw(image: Any) -> Any:
    if image.ndim == 2:
        return image[np.newaxis] if isinstance(image, np.ndarray) else np.asarray(image)[np.newaxis]
    if image.ndim == 3:
        return image
    raise TilingError(f"expected a 2-D (H, W) or 3-D (C, H, W) image, got shape {tuple(image.shape)}")


def _float32(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return x.astype(np.float32, copy=False)


def _resolve_depth(predictor: Any, model: Any, depth: int | None) -> int:
    found = depth or getattr(predictor, "depth", None) or getattr(getattr(model, "config", None), "depth", None)
    if not isinstance(found, int):
        raise TilingError("cannot tell the network depth: pass depth=... for a plain callable")
    return found


def _resolve_batch_size(predict: Callable[..., Any], plan: TilePlan, batch_size: int | None) -> int:
    if batch_size is None:
        owner = getattr(predict, "__self__", predict)
        preferred = getattr(owner, "preferred_batch_size", None)
        batch_size = int(preferred(plan.tile_in)) if callable(preferred) else _DEFAULT_BATCH
        log.debug("batch size %d for %s input windows", batch_size, plan.tile_in)
    if batch_size < 1:
        raise TilingError(f"batch size must be >= 1, got {batch_size}")
    return min(batch_size, len(plan))


def _batches(tiles: Sequence[Tile], size: int) -> list[Sequence[Tile]]:
    return [tiles[i : i + size] for i in range(0, len(tiles), size)]


def _stager(predict: Callable[..., Any]) -> Callable[[npt.NDArray[np.float32]], Any] | None:
    """The ``stage`` hook of a predictor (or of the predictor a bound method belongs to):
    it turns a normalized batch into what the predictor takes (e.g. pinned memory for CUDA)
    and runs on the reader thread, off the model's critical path."""
    stage = getattr(predict, "stage", None) or getattr(getattr(predict, "__self__", None), "stage", None)
    return stage if callable(stage) else None


def _overlaps(predict: Callable[..., Any]) -> bool:
    """Whether to read the next batch on a worker thread while ``predict`` runs."""
    owner = getattr(predict, "__self__", predict)
    value = getattr(owner, "overlap_host_work", True)
    return bool(value)


def _prefetched(
    image: Any,
    plan: TilePlan,
    batch_size: int,
    normalize: Normalize,
    stage: Callable[[npt.NDArray[np.float32]], Any] | None = None,
    *,
    threaded: bool = True,
) -> Iterator[tuple[Sequence[Tile], Any]]:
    """Yield (tiles, normalized input batch), preparing the next batch on a worker thread
    (``threaded``) or in line, just before it is needed."""

    def load(batch: Sequence[Tile]) -> Any:
        x = normalize(np.stack([read_window(image, *t.window, offset=plan.margin) for t in batch]))
        return stage(x) if stage is not None else x

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
    predict: Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]],
    *,
    batch_size: int | None = None,
    normalize: Normalize = _float32,
) -> Iterator[tuple[Tile, npt.NDArray[Any]]]:
    """Yield ``(tile, tile_output)`` for every tile of ``plan``, in order.

    ``predict`` maps a (B, C, h, w) float32 batch to (B, K, th, tw) scores or
    (B, th, tw) labels; anything else is refused with the shape that was expected.
    ``batch_size=None`` asks the predictor (``preferred_batch_size``), else uses 4.
    """
    batch_size = _resolve_batch_size(predict, plan, batch_size)
    th, tw = plan.tile_out
    threaded = _overlaps(predict)
    for batch, x in _prefetched(image, plan, batch_size, normalize, _stager(predict), threaded=threaded):
        y = np.asarray(predict(x))
        if y.ndim not in (3, 4) or y.shape[0] != len(batch) or y.shape[-2:] != (th, tw):
            raise TilingError(
                f"model returned shape {tuple(y.shape)} for a batch of shape {tuple(x.shape)}; "
                f"expected ({len(batch)}, K, {th}, {tw}) scores or ({len(batch)}, {th}, {tw}) labels"
            )
        yield from zip(batch, y, strict=True)


def segment(
    image: Any,
    model: Any,
    *,
    output: Output = "labels",
    tile_size: int | tuple[int, int] = 388,
    stride: int | tuple[int, int] | None = None,
    batch_size: int | None = None,
    normalize: Normalize | None = None,
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
    ``normalize``: maps each raw (B, C, h, w) batch to float32 (default: a plain cast);
    fit it once per image so every tile is treated alike.
    ``batch_size``: tiles read and predicted together; ``None`` lets a
    :class:`~tiling.predictor.TorchPredictor` choose for its device (cache-sized on the
    CPU, from free memory on CUDA), 4 for other callables. It never changes the result.

    Returns (H, W) uint8 class ids for ``output="labels"`` (argmax per tile: no full-size
    score buffer) or (K, H, W) float32 scores (probabilities for a module).

    >>> crop = lambda x: x[:, :, 92:-92, 92:-92]  # the "identity" valid network
    >>> img = np.arange(35, dtype=np.float32).reshape(5, 7)
    >>> bool((segment(img, crop, output="probabilities", depth=4)[0] == img).all())
    True
    """
    if output not in ("labels", "probabilities"):
        raise TilingError(f"output must be 'labels' or 'probabilities', got {output!r}")
    image = _as_chw(image)
    predictor = as_predictor(model, device=device, precision=precision)
    plan = plan_tiles(
        image.shape[-2:], depth=_resolve_depth(predictor, model, depth), tile_size=tile_size, stride=stride
    )
    log.debug("%d tiles of %s for an image of %s", len(plan), plan.tile_out, image.shape)
    if output == "labels":
        predict = getattr(predictor, "predict_labels", None) or _argmax(predictor)
    else:
        predict = predictor
    out: npt.NDArray[Any] | None = None
    for done, (tile, y) in enumerate(
        predict_tiles(image, plan, predict, batch_size=batch_size, normalize=normalize or _float32), 1
    ):
        if out is None:
            out = np.empty((*y.shape[:-2], *plan.image_shape), np.uint8 if output == "labels" else np.float32)
        out[(..., *tile.dest)] = y[(..., *tile.keep)]
        if progress is not None:
            progress(done, len(plan))
    assert out is not None  # a plan always holds at least one tile
    return out


def _argmax(
    predictor: Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]],
) -> Callable[[npt.NDArray[np.float32]], npt.NDArray[np.uint8]]:
    def labels(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
        y = np.asarray(predictor(x))
        if y.ndim != 4:
            raise TilingError(f"model returned shape {tuple(y.shape)}; expected (B, K, h, w) scores")
        labels_: npt.NDArray[np.uint8] = y.argmax(axis=1).astype(np.uint8)
        return labels_

    return labels
