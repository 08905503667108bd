"""``unet-tile synth``, ``train`` and ``evaluate``: make data, train a model, measure it.

The training itself is :mod:`unet.training`; these commands live in the service because
they evaluate through :class:`~service.segmenter.Segmenter` (the held-out Dice, the
background calibration, ``evaluate``): what is measured is what serving computes, and
:mod:`unet` cannot import the service.

* ``synth -o DIR --n N``: synthetic fluorescence-nuclei images (:mod:`unet.synth`) as
  ``DIR/images/synth_0000.tif`` with instance masks ``DIR/masks/synth_0000.tif``.
* ``train --images DIR --masks DIR -o model.safetensors``: trains on image/mask TIFF
  pairs matched by file name (:mod:`unet.training`), writes the self-describing
  checkpoint with the normalization it trained with and its provenance in ``info``.
* ``evaluate --images DIR --masks DIR``: foreground Dice and IoU per image and overall,
  segmenting through :class:`~service.segmenter.Segmenter`, the same engine as serving.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile
import torch

from tiling import resolve_device
from tiling.instances import InstanceRule, label_instances
from unet import Checkpoint, CheckpointError, Normalization, ObjectSize, UNet, UNetConfig, geometry, save_checkpoint
from unet.atomic import atomic_path
from unet.synth import PROFILES, synth_image
from unet.training import TrainConfig, instance_labels, prepare_data, train

from ..errors import InputError
from ..evaluate import Matching, Overlap, match_instances, overlap
from ..instances import instance_rule, scaled_rule
from ..pipeline import Options, resolve, segment_image
from ..scale import Diameter, parse_diameter
from ..segmenter import Segmenter
from ..sources import ArraySource, read_image
from .common import add_model_options, load_segmenter, positive_int

__all__ = [
    "MIN_AREAS",
    "Pair",
    "calibrate_background",
    "calibrate_min_area",
    "evaluate_instances",
    "evaluate_pairs",
    "find_pairs",
    "register",
]

log = logging.getLogger(__name__)

_TIFF_SUFFIXES = (".tif", ".tiff")
CLASS_NAMES = {2: ("background", "nucleus"), 3: ("background", "nucleus", "boundary")}
_SPAWN = multiprocessing.get_context("spawn")  # no fork() of a process that may hold torch's threads
CALIBRATION_OFFSETS = tuple(round(0.1 * i, 1) for i in range(-20, 11))  # background logit shifts tried


@dataclass(frozen=True)
class Pair:
    name: str
    image: Path
    mask: Path


def find_pairs(images: Path, masks: Path) -> list[Pair]:
    """Image and mask TIFFs matched by file name (stem); every image needs its mask."""
    for label, d in (("images", images), ("masks", masks)):
        if not d.is_dir():
            raise InputError(f"{label} directory not found: {d}")
    found = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in _TIFF_SUFFIXES}
    mask_files = {p.stem: p for p in sorted(masks.iterdir()) if p.suffix.lower() in _TIFF_SUFFIXES}
    if not found:
        raise InputError(f"no .tif/.tiff images in {images}")
    missing = sorted(set(found) - set(mask_files))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InputError(
            f"no mask in {masks} for image(s) {', '.join(missing[:3])}{more}; masks share the image's name"
        )
    return [Pair(stem, found[stem], mask_files[stem]) for stem in sorted(found)]


def _planes(pair: Pair) -> tuple[list[npt.NDArray[Any]], list[npt.NDArray[Any]]]:
    """The (C, Y, X) planes of an image and the (Y, X) planes of its mask, checked to match."""
    image = read_image(pair.image)
    mask = read_image(pair.mask)
    if mask.header.channels != 1:
        raise InputError(f"{pair.mask}: a mask must have one channel, got {mask.header.channels}")
    if mask.planes.shape[0] != image.planes.shape[0] or mask.planes.shape[-2:] != image.planes.shape[-2:]:
        raise InputError(
            f"{pair.name}: mask of shape {mask.header.shape} does not match image of shape {image.header.shape}"
        )
    if mask.planes.dtype.kind not in "biu":
        raise InputError(f"{pair.mask}: a mask must hold integer labels, got {mask.planes.dtype}")
    return list(image.planes), [m[0] for m in mask.planes]


def evaluate_pairs(segmenter: Segmenter, pairs: Sequence[Pair], *, tile_size: int = 388) -> list[tuple[str, Overlap]]:
    """Per image: the overlap of the model's foreground classes with the mask's non-zero pixels."""
    return [(name, o) for name, o, _ in evaluate_instances(segmenter, pairs, tile_size=tile_size)]


def evaluate_instances(
    segmenter: Segmenter,
    pairs: Sequence[Pair],
    *,
    tile_size: int = 388,
    min_area: int | None = None,
    diameter: Diameter = "auto",
) -> list[tuple[str, Overlap, Matching]]:
    """Per image: the foreground overlap, and the instances (the rule ``--output instances``
    applies: :func:`service.instances.instance_rule`, at the scale the image is segmented at)
    matched to the mask's objects at IoU 0.5 (a binary mask's objects are its connected
    components)."""
    fg = np.asarray(segmenter.checkpoint.foreground)
    results = []
    for pair in pairs:
        image = read_image(pair.image)
        _, masks = _planes(pair)
        options = resolve(segmenter, ArraySource.of(image), Options(tile_size=tile_size, diameter=diameter))
        labels = segment_image(segmenter, image, options)
        factor = options.scale.factor if options.scale is not None else 1.0
        rule = scaled_rule(instance_rule(segmenter.checkpoint, min_area), factor, min_area_given=min_area is not None)
        total, matched = Overlap(0, 0, 0), Matching(0, 0, 0)
        for pred, truth in zip(labels, masks, strict=True):
            total = total + overlap(np.isin(pred, fg), truth)
            matched = matched + match_instances(label_instances(pred, rule), instance_labels(truth))
        results.append((pair.name, total, matched))
    return results


def calibrate_background(segmenter: Segmenter, pairs: Sequence[Pair]) -> tuple[float, dict[float, float]]:
    """The background logit offset that maximizes pooled foreground Dice on ``pairs``.

    A pixel is foreground when its best foreground class beats the background; adding
    ``offset`` to the background logit moves that decision (a negative offset grows the
    objects). Returns the best offset of :data:`CALIBRATION_OFFSETS` and the pooled Dice
    for each one. Needs class 0 to be the background and every other class foreground.
    """
    k = segmenter.checkpoint.config.num_classes
    if segmenter.checkpoint.foreground != tuple(range(1, k)):
        raise InputError(f"calibration needs classes 1..{k - 1} as foreground, got {segmenter.checkpoint.foreground}")
    counts = np.zeros((len(CALIBRATION_OFFSETS), 3), np.int64)  # tp, fp, fn per offset
    for pair in pairs:
        probs = segment_image(segmenter, read_image(pair.image), Options(output="probabilities"))  # (planes, K, Y, X)
        _, masks = _planes(pair)
        for p, truth in zip(probs, masks, strict=True):
            logp = np.log(np.clip(p, 1e-12, None))
            margin = logp[1:].max(axis=0) - logp[0]  # > offset: foreground
            t = truth > 0
            for i, offset in enumerate(CALIBRATION_OFFSETS):
                o = overlap(margin > offset, t)
                counts[i] += (o.tp, o.fp, o.fn)
    scores = {off: float(Overlap(*map(int, c)).dice) for off, c in zip(CALIBRATION_OFFSETS, counts, strict=True)}
    best = max(CALIBRATION_OFFSETS, key=lambda off: (scores[off], -abs(off)))
    return best, scores


MIN_AREAS = (0, 5, 10, 15, 20, 30, 40, 60)  # object sizes (px) --calibrate tries for the instance rule


def calibrate_min_area(segmenter: Segmenter, pairs: Sequence[Pair]) -> tuple[int, dict[int, float]]:
    """The instance rule's minimum object size (of :data:`MIN_AREAS`) that maximizes the
    instance F1 at IoU 0.5 pooled over ``pairs``, and the F1 for each one (the smallest size
    wins a tie). The class labels are computed once."""
    base = instance_rule(segmenter.checkpoint, 0)
    planes: list[tuple[npt.NDArray[Any], npt.NDArray[Any]]] = []
    for pair in pairs:
        labels = segment_image(segmenter, read_image(pair.image))
        _, masks = _planes(pair)
        planes.extend((pred, instance_labels(truth)) for pred, truth in zip(labels, masks, strict=True))
    f1_at = {}
    for m in MIN_AREAS:
        rule = dataclasses.replace(base, min_area=m)
        f1_at[m] = sum((match_instances(label_instances(p, rule), t) for p, t in planes), Matching(0, 0, 0)).f1
    best = max(MIN_AREAS, key=lambda m: (round(f1_at[m], 6), -m))
    return best, f1_at


def _summary(results: Sequence[tuple[str, Overlap]]) -> dict[str, float]:
    pooled = sum((o for _, o in results), Overlap(0, 0, 0))
    return {
        "dice": pooled.dice,
        "iou": pooled.iou,
        "mean_dice": float(np.mean([o.dice for _, o in results])),
        "mean_iou": float(np.mean([o.iou for _, o in results])),
        "images": float(len(results)),
    }


# --- synth -----------------------------------------------------------------------------


def _write_tiff_atomic(path: Path, data: npt.NDArray[Any]) -> None:
    with atomic_path(path) as part:  # made with the umask's permissions: a data set is for sharing
        tifffile.imwrite(part, data, compression="zlib", metadata={"axes": "YX"})


def _synth_one(job: tuple[Path, int, int, tuple[int, int], str | None, str]) -> None:
    out, seed, i, size, dtype, profile = job
    sample = synth_image(np.random.default_rng([seed, i]), size, dtype=dtype, profile=profile)
    name = f"synth_{i:04d}.tif"
    _write_tiff_atomic(out / "images" / name, sample.image)
    _write_tiff_atomic(out / "masks" / name, sample.labels)


def _synth(args: argparse.Namespace) -> int:
    out: Path = args.output
    images, masks = out / "images", out / "masks"
    for d in (images, masks):
        if d.exists() and any(d.iterdir()):
            raise InputError(f"{d} is not empty; synth writes a fresh set (choose another -o)")
    if out.exists() and not out.is_dir():
        raise InputError(f"output exists and is not a directory: {out}")
    size = args.size * 2 if len(args.size) == 1 else args.size
    if len(size) != 2 or min(size) < 8:
        raise InputError(f"--size takes one or two integers >= 8 (height [width]), got {args.size}")
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    dtype = None if args.dtype == "random" else args.dtype
    t0 = time.perf_counter()
    jobs = [(out, args.seed, i, (size[0], size[1]), dtype, args.profile) for i in range(args.n)]
    done = 0
    with contextlib.ExitStack() as stack:
        if args.workers > 1:  # image i depends only on (seed, i): the same files for any worker count
            pool = stack.enter_context(ProcessPoolExecutor(min(args.workers, args.n), mp_context=_SPAWN))
            results: Iterable[None] = pool.map(_synth_one, jobs, chunksize=4)
        else:
            results = map(_synth_one, jobs)
        for _ in results:
            done += 1
            if not args.quiet and (done % 50 == 0 or done == args.n):
                print(f"synth: {done}/{args.n} images ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


# --- train -----------------------------------------------------------------------------


def _load_training_set(images: Path, masks: Path) -> tuple[list[npt.NDArray[Any]], list[npt.NDArray[Any]]]:
    xs, ys = [], []
    for pair in find_pairs(images, masks):
        planes, labels = _planes(pair)
        xs.extend(planes)
        ys.extend(labels)
    return xs, ys


def _train_command(args: argparse.Namespace) -> str:
    """The fully explicit command line that reproduces this run."""
    parts = [
        "unet-tile", "train", "--images", str(args.images), "--masks", str(args.masks), "-o", str(args.output),
        "--seed", str(args.seed), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--patch-size", str(args.patch_size), "--base-width", str(args.base_width), "--depth", str(args.depth),
        "--lr", str(args.lr), "--w0", str(args.w0), "--sigma", str(args.sigma), "--ema-decay", str(args.ema_decay),
        "--bf16" if args.bf16 else "--no-bf16", "--classes", str(args.classes), "--device", args.device,
    ]  # fmt: skip
    if args.dice:
        parts += ["--dice", str(args.dice)]
    if args.boundary_width != 1:
        parts += ["--boundary-width", str(args.boundary_width)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.val_images is not None:
        parts += ["--val-images", str(args.val_images), "--val-masks", str(args.val_masks)]
        if args.calibrate:
            parts.append("--calibrate")
    if args.object_size is not None:
        parts += ["--object-size", *(f"{v:g}" for v in args.object_size)]
        if args.pixel_size_um is not None:
            parts += ["--pixel-size-um", f"{args.pixel_size_um:g}"]
    return shlex.join(parts)


def _loader_threads(requested: int | None, device: torch.device) -> int:
    """Batch-cutting threads: as asked; by default 0 on a CPU (its cores train), up to 8 beside a GPU."""
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def _train(args: argparse.Namespace) -> int:
    if not args.output.parent.is_dir():
        raise InputError(f"output directory does not exist: {args.output.parent}")
    if (args.val_images is None) != (args.val_masks is None):
        raise InputError("--val-images and --val-masks go together")
    if args.calibrate and args.val_images is None:
        raise InputError("--calibrate needs a validation set (--val-images and --val-masks)")
    if args.boundary_width != 1 and (args.classes != 3 or args.boundary_width % 2):
        raise InputError(
            f"--boundary-width {args.boundary_width}: needs --classes 3 and a width of 1 or an even number"
        )
    geometry.check_input_size(args.patch_size, args.depth)
    device = resolve_device(args.device)
    args.device = device.type  # the recorded command names the device the run used
    val_pairs = find_pairs(args.val_images, args.val_masks) if args.val_images is not None else []
    images, masks = _load_training_set(args.images, args.masks)
    channels = images[0].shape[0]
    normalization = Normalization()  # per-image percentiles 1 - 99.8: what serving applies too
    t0 = time.perf_counter()
    data = prepare_data(
        images,
        masks,
        normalization,
        w0=args.w0,
        sigma=args.sigma,
        num_classes=args.classes,
        boundary_width=args.boundary_width,
    )
    size = _object_size(args, masks)  # the masks' diameters, before they are freed
    del images, masks
    log.info("prepared %d training planes in %.1f s", len(data), time.perf_counter() - t0)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        w0=args.w0,
        sigma=args.sigma,
        seed=args.seed,
        save_every=args.save_every,
        bf16=args.bf16,
        dice=args.dice,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = UNet(
        UNetConfig(in_channels=channels, num_classes=args.classes, depth=args.depth, base_width=args.base_width)
    )
    class_names, foreground = CLASS_NAMES[args.classes], tuple(range(1, args.classes))
    state = args.state or args.output.with_name(args.output.name + ".state.pt")
    started = time.perf_counter()
    first_step = [0]
    if args.resume and state.is_file():
        first_step[0] = int(torch.load(state, map_location="cpu", weights_only=True)["step"])

    def progress(step: int, total: int, loss: float) -> None:
        if args.quiet or (step % args.log_every and step != total):
            return
        now = time.perf_counter()
        rate = (now - started) / max(step - first_step[0], 1)
        print(
            f"train: step {step}/{total} loss {loss:.4f} ({rate:.2f} s/step, eta {rate * (total - step) / 60:.1f} min)",
            file=sys.stderr,
            flush=True,
        )

    result = train(
        model,
        data,
        config,
        state_path=state,
        resume=args.resume,
        progress=progress,
        device=device,
        loader_threads=_loader_threads(args.loader_threads, device),
    )
    info: dict[str, Any] = {
        "command": _train_command(args),
        "seed": args.seed,
        "wall_time_s": round(result.wall_s, 1),
        "steps": result.steps,
        "final_loss": round(float(np.mean(result.losses[-50:])), 5) if result.losses else None,
        "train": config.to_dict(),
        "data": {
            "images": str(args.images),
            "masks": str(args.masks),
            "planes": len(data),
            "fingerprint": data.fingerprint,
        },
        "weights": "EMA of the training weights",
        "software": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        },
    }
    if val_pairs and args.calibrate:
        ck = Checkpoint(result.model, normalization, class_names, foreground, sha256="")
        offset, dice_at = calibrate_background(Segmenter(ck, device=str(device), batch_size=2), val_pairs)
        bias = result.model.head.bias
        assert bias is not None  # the 1x1 head always has one
        with torch.no_grad():
            bias[0] += offset  # folded into the weights: serving needs nothing new
        info["calibration"] = {"background_logit_offset": offset, "dice_before": round(dice_at[0.0], 4)}
        print(
            f"train: calibrated the background logit by {offset:+.1f} on {len(val_pairs)} images "
            f"(pooled Dice {dice_at[0.0]:.4f} -> {dice_at[offset]:.4f})",
            file=sys.stderr,
        )
    grow = tuple(k for k in foreground if class_names[k] == "boundary")
    rule = InstanceRule(seeds=tuple(k for k in foreground if k not in grow), grow=grow)
    if val_pairs and args.calibrate:
        ck = Checkpoint(result.model, normalization, class_names, foreground, sha256="", instances=rule.to_dict())
        min_area, f1_at = calibrate_min_area(Segmenter(ck, device=str(device), batch_size=2), val_pairs)
        rule = dataclasses.replace(rule, min_area=min_area)
        info["calibration"]["min_area"] = min_area
        info["calibration"]["instance_f1"] = {str(m): round(f, 4) for m, f in f1_at.items()}
        print(
            f"train: calibrated the instances' minimum area to {min_area} px "
            f"(instance F1 {f1_at[0]:.4f} -> {f1_at[min_area]:.4f})",
            file=sys.stderr,
        )
    if val_pairs:
        ck = Checkpoint(result.model, normalization, class_names, foreground, sha256="", instances=rule.to_dict())
        results = evaluate_instances(Segmenter(ck, device=str(device), batch_size=2), val_pairs)
        scores = _summary([(name, o) for name, o, _ in results])
        f1 = sum((m for _, _, m in results), Matching(0, 0, 0)).f1
        info["held_out"] = {
            **{k: round(v, 4) for k, v in scores.items()},
            "f1": round(f1, 4),
            "dir": str(args.val_images),
        }
        print(
            f"train: held-out Dice {scores['dice']:.4f} IoU {scores['iou']:.4f} instance F1 {f1:.4f}"
            f" on {len(val_pairs)} images",
            file=sys.stderr,
        )
    sha = save_checkpoint(
        args.output,
        result.model,
        normalization=normalization,
        class_names=class_names,
        foreground=foreground,
        info=info,
        instances=rule.to_dict(),
        weights_dtype=args.weights_dtype,
        size=size,
    )
    print(f"train: wrote {args.output} (sha256 {sha}) after {result.wall_s / 60:.1f} min", file=sys.stderr)
    return 0


def _diameter(value: str) -> Diameter:
    try:
        return parse_diameter(value)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _object_size(args: argparse.Namespace, masks: list[npt.NDArray[Any]]) -> ObjectSize | None:
    """``--object-size`` with the range of diameters the training masks hold (1st-99th
    percentile of the objects' equivalent diameters), or None when not asked for."""
    if args.object_size is None:
        return None
    native, low, high = args.object_size
    diameters = []
    for m in masks:
        area = np.bincount(np.asarray(m, np.int64).ravel())[1:]
        diameters.append(np.sqrt(4.0 * area[area > 0] / np.pi))
    d = np.concatenate(diameters) if diameters else np.zeros(0)
    trained = (round(float(np.percentile(d, 1)), 1), round(float(np.percentile(d, 99)), 1)) if d.size else None
    try:
        return ObjectSize(native, low, high, trained, args.pixel_size_um)
    except CheckpointError as e:
        raise InputError(f"--object-size: {e}") from None


# --- evaluate --------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> int:
    pairs = find_pairs(args.images, args.masks)
    segmenter = load_segmenter(args)
    results = evaluate_instances(
        segmenter, pairs, tile_size=args.tile_size, min_area=args.min_area, diameter=args.diameter
    )
    width = max(len(name) for name, _, _ in results)
    print(f"{'image':<{width}}  dice    iou     f1@0.5")
    for name, o, m in results:
        print(f"{name:<{width}}  {o.dice:.4f}  {o.iou:.4f}  {m.f1:.4f}")
    s = _summary([(name, o) for name, o, _ in results])
    matched = sum((m for _, _, m in results), Matching(0, 0, 0))
    print(
        f"{'overall':<{width}}  {s['dice']:.4f}  {s['iou']:.4f}  {matched.f1:.4f}  (pooled over all pixels;"
        f" objects: {matched.tp} matched, {matched.fp} false, {matched.fn} missed)"
    )
    mean_f1 = float(np.mean([m.f1 for _, _, m in results]))
    print(
        f"{'mean':<{width}}  {s['mean_dice']:.4f}  {s['mean_iou']:.4f}  {mean_f1:.4f}  (mean over {len(results)} images)"
    )
    return 0


# --- registration ----------------------------------------------------------------------


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _pos_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def register(sub: Any) -> None:
    """Add ``synth``, ``train`` and ``evaluate`` to the subcommands ``sub``."""
    p = sub.add_parser("synth", help="write synthetic fluorescence-nuclei images and masks")
    p.add_argument("-o", "--output", type=Path, required=True, help="directory; gets images/ and masks/")
    p.add_argument("--n", type=positive_int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); image i uses stream (seed, i)")
    p.add_argument("--size", type=positive_int, nargs="+", default=[384], help="height [width] (default 384)")
    p.add_argument(
        "--dtype", choices=["random", "uint8", "uint16"], default="random", help="pixel type (default: half each)"
    )
    p.add_argument(
        "--workers", type=positive_int, default=1, help="processes (default 1); the files do not depend on it"
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="classic",
        help="what the images show (default classic: widefield, nuclei 7-60 px; microscopes: the demo "
        "model's mix, 8-120 px, textured stains, confocal and saturated nuclei; large: 60-120 px; textured)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train a U-Net on image/mask TIFF pairs")
    p.add_argument("--images", type=Path, required=True, help="directory of image TIFFs")
    p.add_argument("--masks", type=Path, required=True, help="directory of mask TIFFs (same names; 0 = background)")
    p.add_argument("-o", "--output", type=Path, required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=1200)
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--patch-size", type=positive_int, default=380, help="input patch side, a valid size (default 380)")
    p.add_argument("--base-width", type=positive_int, default=16)
    p.add_argument("--depth", type=positive_int, default=4)
    p.add_argument("--lr", type=_pos_float, default=1e-3)
    p.add_argument("--w0", type=_nonneg_float, default=10.0, help="border weight amplitude (paper: 10; 0 = off)")
    p.add_argument("--sigma", type=_pos_float, default=5.0, help="border weight width in px (paper: 5)")
    p.add_argument("--ema-decay", type=_nonneg_float, default=0.998)
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=False, help="bfloat16 autocast (faster on AMX CPUs)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (default: torch's; 1 is best on a busy machine)"
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the network trains (default auto: CUDA when available); patches are augmented on the CPU",
    )
    p.add_argument(
        "--loader-threads",
        type=_nonneg_int,
        default=None,
        help="threads that augment the next batches during a step (default: 0 on a CPU, up to 8 beside a GPU)",
    )
    p.add_argument(
        "--dice",
        type=_nonneg_float,
        default=0.0,
        help="weight of a soft foreground-Dice term added to the weighted cross-entropy (default 0: off)",
    )
    p.add_argument(
        "--weights-dtype", choices=["float32", "float16"], default="float16", help="stored weights (default float16)"
    )
    p.add_argument(
        "--val-images",
        type=Path,
        default=None,
        help="validation images: their Dice goes into the checkpoint's info (and --calibrate tunes on them)",
    )
    p.add_argument("--val-masks", type=Path, default=None)
    p.add_argument(
        "--classes",
        type=int,
        choices=[2, 3],
        default=2,
        help="2: background, nucleus (touching nuclei kept apart by a background gap); "
        "3: + a boundary class on the contact lines (foreground = nucleus + boundary)",
    )
    p.add_argument(
        "--boundary-width",
        type=positive_int,
        default=1,
        help="with --classes 3: 1 = the contact pixels of one of two touching nuclei (default); "
        "2 = those of both (a 2-px line that one misread pixel does not break)",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="after training, shift the background logit to the offset that maximizes Dice on the validation set",
    )
    p.add_argument(
        "--object-size",
        type=_pos_float,
        nargs=3,
        default=None,
        metavar=("NATIVE", "LOW", "HIGH"),
        help="record the object diameters (px) the model segments as they are (LOW-HIGH) and the one images with"
        " other sizes are rescaled to (NATIVE); with the training masks' range (see segment --diameter)",
    )
    p.add_argument(
        "--pixel-size-um",
        type=_pos_float,
        default=None,
        help="with --object-size: the pixel size (µm) the native scale stands for (segment --pixel-size)",
    )
    p.add_argument("--state", type=Path, default=None, help="resumable state file (default: OUTPUT.state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from the state file")
    p.add_argument("--save-every", type=positive_int, default=50, help="steps between state-file writes")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between progress lines")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "evaluate", help="foreground Dice and IoU, and instance F1 at IoU 0.5, of a model on image/mask pairs"
    )
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True, help="instance ids, or a binary mask (objects: components)")
    p.add_argument("--tile-size", type=positive_int, default=388)
    p.add_argument(
        "--min-area", type=int, default=None, metavar="PX", help="instances: as for segment (default: the checkpoint's)"
    )
    p.add_argument(
        "--diameter",
        type=_diameter,
        default="auto",
        metavar="PX|auto|off",
        help="as for segment (default auto: each image's objects measured, rescaled when outside the model's range)",
    )
    add_model_options(p)
    p.set_defaults(func=_evaluate)
