"""Training a valid-padding U-Net on image/mask pairs, as in the paper, on a CPU budget.

* **Patches at valid sizes.** Every input patch is a valid size (``16k + 124`` for
  depth 4) and its mask and loss weights are cropped to the network's output, so the
  loss sees exactly the pixels the network predicts with full context.
* **Augmentation** (:mod:`unet.augment`): elastic deformation, any rotation, zoom and
  flips through one coordinate map shared by image, mask and weights; intensity jitter.
* **Loss** (:mod:`unet.losses`): cross-entropy weighted by the paper's border weight map
  (computed once per training image), so touching objects stay apart.
* **Deterministic**: weights are initialised from ``seed`` and batch ``s`` is drawn from
  its own stream ``default_rng([seed, s])``, so a run resumed from its state file draws
  the same batches as an uninterrupted one.
* **Resumable**: model, EMA and optimizer state are written atomically every
  ``save_every`` steps (``torch.save`` of tensors and numbers only, read back with
  ``weights_only=True``).
* **EMA of the weights** is what the run returns: averaging over the last few hundred
  steps makes synthetic-to-real transfer steadier than the last iterate.

Images are normalized per whole image with the checkpoint's
:class:`~unet.Normalization` before patches are cut, exactly as the tiling engine does
at inference.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from . import geometry
from .atomic import atomic_path
from .augment import intensity_jitter, random_warp, sample_patch, warp_coordinates
from .errors import UNetError
from .losses import border_weight_map, boundary_target, separate_touching, soft_dice_loss, weighted_cross_entropy
from .model import UNet
from .normalization import Normalization

__all__ = [
    "EMA",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "instance_labels",
    "prepare_data",
    "sample_batch",
    "train",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float], None]  # (step done, total steps, recent mean loss)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 2  # patches per step
    patch_size: int = 380  # input patch side, a valid size (16k+124 for depth 4): output 196
    lr: float = 1e-3  # Adam peak learning rate (linear warm-up, cosine decay to 5 %)
    warmup: int = 50  # warm-up steps
    ema_decay: float = 0.998  # EMA of the weights (the returned model)
    w0: float = 10.0  # border weight amplitude (paper: 10)
    sigma: float = 5.0  # border weight width in px (paper: 5)
    elastic_sigma: float = 10.0  # std of the coarse 3x3 elastic displacements in px (paper: 10)
    scale_min: float = 0.75  # zoom augmentation range (on top of the data's own scale spread)
    scale_max: float = 1.33
    intensity: float = 1.0  # strength of the intensity jitter (0 disables it)
    seed: int = 0
    save_every: int = 100  # steps between state-file writes
    bf16: bool = False  # bfloat16 autocast for the forward pass (about 2x on CPUs with AMX/AVX-512 BF16)
    dice: float = 0.0  # weight of a soft foreground Dice term added to the weighted cross-entropy

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "patch_size", "save_every"):
            if int(getattr(self, name)) < 1:
                raise UNetError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UNetError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.scale_min <= self.scale_max:
            raise UNetError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        if self.lr <= 0:
            raise UNetError(f"lr must be > 0, got {self.lr}")
        if self.dice < 0:
            raise UNetError(f"dice must be >= 0, got {self.dice}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingData:
    """Normalized images with their class targets and loss weights, ready to sample."""

    images: list[npt.NDArray[np.float32]]  # (C, H, W), normalized per whole image
    targets: list[npt.NDArray[np.uint8]]  # (H, W) 0 background / 1 object [/ 2 contact boundary]
    weights: list[npt.NDArray[np.float32]]  # (H, W) the paper's w(x)
    fingerprint: str  # identifies the data in the resumable state

    def __len__(self) -> int:
        return len(self.images)


def instance_labels(mask: npt.NDArray[Any]) -> npt.NDArray[np.int32]:
    """Instance ids from a mask: kept as they are, or connected components of a binary mask.

    >>> instance_labels(np.array([[255, 0, 255]])).tolist()
    [[1, 0, 2]]
    >>> instance_labels(np.array([[3, 3, 7]])).tolist()
    [[3, 3, 7]]
    """
    m = np.asarray(mask)
    if m.dtype.kind not in "biu":
        raise UNetError(f"masks must hold integer labels (0 = background), got dtype {m.dtype}")
    values = np.unique(m)
    if np.count_nonzero(values) <= 1:  # binary (0/1, 0/255): objects are its connected components
        labelled, _ = ndimage.label(m > 0)
        return np.asarray(labelled, np.int32)
    return m.astype(np.int32)


def prepare_data(
    images: Sequence[npt.NDArray[Any]],
    masks: Sequence[npt.NDArray[Any]],
    normalization: Normalization,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    num_classes: int = 2,
    boundary_width: int = 1,
) -> TrainingData:
    """Normalize each (H, W) or (C, H, W) image and build its target and weight map.

    ``num_classes`` 2: background / object with a background gap between touching
    objects (:func:`~unet.losses.separate_touching`); 3: the gap is its own boundary
    class (:func:`~unet.losses.boundary_target`), ``boundary_width`` px thick (1 or even).
    """
    if num_classes not in (2, 3):
        raise UNetError(f"training supports 2 classes (background, object) or 3 (+ boundary), got {num_classes}")
    if len(images) != len(masks) or not images:
        raise UNetError(f"need the same non-zero number of images and masks, got {len(images)} and {len(masks)}")
    out_img: list[npt.NDArray[np.float32]] = []
    out_t: list[npt.NDArray[np.uint8]] = []
    out_w: list[npt.NDArray[np.float32]] = []
    if boundary_width != 1 and num_classes != 3:
        raise UNetError("a boundary width needs the 3-class target (--classes 3)")
    if boundary_width < 1 or (boundary_width % 2 and boundary_width != 1):
        raise UNetError(f"the boundary width must be 1 or even, got {boundary_width}")
    h = hashlib.sha256()
    if boundary_width != 1:  # other targets from the same pairs (width 1 hashes as before)
        h.update(f"boundary-width {boundary_width}".encode())
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        chw = np.asarray(image)[np.newaxis] if np.asarray(image).ndim == 2 else np.asarray(image)
        if chw.ndim != 3 or chw.shape[-2:] != np.asarray(mask).shape:
            raise UNetError(
                f"pair {i}: image of shape {tuple(np.asarray(image).shape)} does not match mask {np.asarray(mask).shape}"
            )
        if out_img and chw.shape[0] != out_img[0].shape[0]:
            raise UNetError(f"pair {i}: {chw.shape[0]} channel(s), the first image has {out_img[0].shape[0]}")
        norm = normalization.fit(chw)(chw[np.newaxis])[0]
        labels = instance_labels(mask)
        target = separate_touching(labels) if num_classes == 2 else boundary_target(labels, boundary_width)
        out_img.append(np.ascontiguousarray(norm, np.float32))
        out_t.append(target)
        out_w.append(border_weight_map(labels, w0=w0, sigma=sigma, num_classes=num_classes, target=target))
        h.update(np.ascontiguousarray(chw).tobytes())
        h.update(np.ascontiguousarray(labels).tobytes())
    return TrainingData(out_img, out_t, out_w, h.hexdigest()[:16])


def sample_batch(
    data: TrainingData, rng: np.random.Generator, config: TrainConfig, depth: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of augmented valid-size patches: x (B, C, N, N), target and weights (B, n, n)."""
    n_in = config.patch_size
    crop = geometry.context_margin(depth)
    geometry.check_input_size(n_in, depth)
    xs, ys, ws = [], [], []
    for _ in range(config.batch_size):
        i = int(rng.integers(len(data)))
        image, target, weights = data.images[i], data.targets[i], data.weights[i]
        h, w = target.shape
        warp = random_warp(
            rng, (n_in, n_in), elastic_sigma=config.elastic_sigma, scale_range=(config.scale_min, config.scale_max)
        )
        center = (float(rng.uniform(0, h - 1)), float(rng.uniform(0, w - 1)))
        coords = warp_coordinates(warp, (n_in, n_in), center)
        channels = []
        for c in range(image.shape[0]):
            if c == 0:
                patch, t, wt = sample_patch(coords, image[c], mask=target, weights=weights, crop=crop)
            else:
                patch, _, _ = sample_patch(coords, image[c])
            channels.append(intensity_jitter(rng, patch, strength=config.intensity))
        assert t is not None and wt is not None
        xs.append(np.stack(channels))
        ys.append(t)
        ws.append(wt)
    return (
        torch.from_numpy(np.stack(xs)),
        torch.from_numpy(np.stack(ys).astype(np.int64)),
        torch.from_numpy(np.stack(ws)),
    )


class EMA:
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: UNet, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: UNet, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))  # short memory early on
        ema_state = self.model.state_dict()
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                ema_state[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                ema_state[k].copy_(v)


@dataclass
class TrainResult:
    model: UNet  # the EMA model, in eval mode
    steps: int
    wall_s: float  # seconds spent in this process (a resumed run adds the earlier runs')
    losses: list[float] = field(default_factory=list)  # per step, from step 1


def _memory_format(model: UNet, fmt: torch.memory_format) -> None:
    model.to(memory_format=fmt)  # type: ignore[call-overload]  # torch's stubs lack this overload


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batches(
    data: TrainingData, config: TrainConfig, depth: int, start: int, threads: int
) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """``(step, batch)`` from ``start`` on; batch ``s`` always comes from stream ``(seed, s)``."""

    def make(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sample_batch(data, np.random.default_rng([config.seed, step]), config, depth)

    steps = iter(range(start, config.steps))
    if threads <= 0:
        yield from ((step, make(step)) for step in steps)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="unet-batches")
    try:
        ahead = collections.deque((s, pool.submit(make, s)) for s in itertools.islice(steps, 2 * threads))
        while ahead:
            step, future = ahead.popleft()
            for s in itertools.islice(steps, 1):
                ahead.append((s, pool.submit(make, s)))
            yield step, future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def _signature(model: UNet, config: TrainConfig, data: TrainingData) -> str:
    cfg = config.to_dict()
    cfg.pop("save_every")  # may change between a run and its resumption
    if not cfg["dice"]:
        cfg.pop("dice")  # state files written before the option existed still resume
    return json.dumps({"model": model.config.to_dict(), "train": cfg, "data": data.fingerprint}, sort_keys=True)


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as part:
        torch.save(state, part)


def train(
    model: UNet,
    data: TrainingData,
    config: TrainConfig,
    *,
    state_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    device: str | torch.device = "cpu",
    loader_threads: int = 0,
) -> TrainResult:
    """Train ``model`` in place on ``data``; return the EMA of its weights (on the CPU).

    ``state_path``: where the resumable state is written every ``config.save_every``
    steps and at the end. ``resume``: continue from it; refused if it was written for
    another model, configuration or data set (the device may differ). ``device``: where
    the forward and backward passes run; patches are always cut and augmented on the CPU.
    On CUDA the run is repeatable only up to cuDNN's nondeterministic kernels.
    ``loader_threads``: threads that cut and augment the next batches while the network
    trains (SciPy's resampling releases the GIL); 0 cuts each batch in line. The batches
    are the same either way.
    """
    if data.images[0].shape[0] != model.config.in_channels:
        raise UNetError(f"model expects {model.config.in_channels} channel(s), the data has {data.images[0].shape[0]}")
    if model.config.num_classes not in (2, 3):
        raise UNetError(
            f"training supports 2 classes (background, object) or 3 (+ boundary), model has {model.config.num_classes}"
        )
    top = max(int(t.max()) for t in data.targets)
    if top >= model.config.num_classes:
        raise UNetError(f"the data has class {top}, the model only {model.config.num_classes} classes")
    geometry.check_input_size(config.patch_size, model.config.depth)
    torch.manual_seed(config.seed)
    dev = torch.device(device)
    model.to(dev)
    _memory_format(model, torch.channels_last)  # faster convolutions on CPU and GPU; same numbers
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    ema = EMA(model, config.ema_decay)
    start, wall_before, losses = 0, 0.0, []
    path = Path(state_path) if state_path is not None else None
    signature = _signature(model, config, data)
    if resume:
        if path is None or not path.is_file():
            raise UNetError(f"cannot resume: no training state file at {path}")
        state = torch.load(path, map_location=dev, weights_only=True)
        if state.get("signature") != signature:
            raise UNetError(f"cannot resume from {path}: it was written for another model, configuration or data set")
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start, wall_before = int(state["step"]), float(state["wall_s"])
        losses = [float(v) for v in state["losses"].tolist()]
        log.info("resumed from %s at step %d", path, start)
    t0 = time.perf_counter()

    def checkpoint_state(step: int) -> None:
        if path is None:
            return
        _save_state(
            path,
            {
                "signature": signature,
                "step": step,
                "wall_s": wall_before + time.perf_counter() - t0,
                "model": model.state_dict(),
                "ema": ema.model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "losses": torch.tensor(losses, dtype=torch.float64),
            },
        )

    model.train()
    for step, batch in _batches(data, config, model.config.depth, start, loader_threads):
        x, y, w = (t.to(dev) for t in batch)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        loss = weighted_cross_entropy(logits.float(), y, w)
        if config.dice:
            loss = loss + config.dice * soft_dice_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        ema.update(model, step)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UNetError(f"training diverged at step {step + 1} (loss {value}); try a lower --lr")
        losses.append(value)
        if progress is not None:
            progress(step + 1, config.steps, float(np.mean(losses[-20:])))
        if (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            checkpoint_state(step + 1)
    checkpoint_state(config.steps)
    _memory_format(model.eval().cpu(), torch.contiguous_format)
    _memory_format(ema.model.cpu(), torch.contiguous_format)
    return TrainResult(ema.model.eval(), config.steps, wall_before + time.perf_counter() - t0, losses)
