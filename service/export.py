"""A checkpoint for other runtimes and the bioimage.io model zoo, and a bioimage.io package back.

* :func:`export_torchscript`, :func:`export_onnx`: the fp32 network as one file
  (:mod:`unet.export`); TorchScript is what deepImageJ and QuPath load.
* :func:`export_bioimageio`: a bioimage.io model package (a zip of an ``rdf.yaml`` in model
  format 0.5 built with ``bioimageio.spec``'s own description classes, TorchScript and ONNX
  weights, test tensors, a cover, a README and our checkpoint's metadata under
  ``config.unet_tile``), tested with ``bioimageio.core``'s own model test before it is put in
  place (:func:`check_package`).
* :func:`import_bioimageio`: such a package (zip or folder) as a checkpoint: the U-Net is
  rebuilt from the package's ``config.unet_tile`` (or inferred from the weights' names and
  shapes), its tensors are read from the TorchScript or ONNX weights without running
  anything from the package, and the rebuilt network must reproduce the package's test
  output before the checkpoint is written.

Nothing here downloads anything: the descriptions written name no URL (the citation is a
DOI, which is not looked up), and a package whose weights are at a URL is refused.

The optional libraries are imported when used; without them the functions raise
:class:`~service.errors.InputError` naming the extra to install (``unet-tile[onnx]``,
``unet-tile[bioimageio]``).
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import tifffile
import torch

import unet.export as unet_export
from unet import (
    Checkpoint,
    CheckpointError,
    Normalization,
    ObjectSize,
    UNet,
    UNetConfig,
    UNetError,
    file_sha256,
    geometry,
    import_state_dict,
    save_checkpoint,
)
from unet.atomic import atomic_path
from unet.synth import synth_image

from .errors import InputError

if TYPE_CHECKING:
    from bioimageio.spec.model.v0_5 import ModelDescr

__all__ = [
    "CITATION_DOI",
    "ImportedPackage",
    "PackageCheck",
    "PackageTestError",
    "check_package",
    "export_bioimageio",
    "export_onnx",
    "export_torchscript",
    "import_bioimageio",
    "require",
]

log = logging.getLogger(__name__)

CITATION_DOI = "10.1007/978-3-319-24574-4_28"  # Ronneberger, Fischer & Brox, MICCAI 2015
_CONFIG_KEY = "unet_tile"  # our section of the package's `config`
_EPS = 1e-6  # bioimage.io's scale_range: (x - lo) / (hi - lo + eps)
_TEST_STEPS = 12  # the test input is the (12 steps above the smallest) valid size: 380 px for depth 4
_EXTRAS = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "bioimageio": ("bioimageio.spec", "bioimageio.core", "onnx", "onnxscript", "onnxruntime", "imageio"),
}
_WEIGHTS = ("torchscript", "onnx")  # what import reads, in the order "auto" tries them


class PackageTestError(RuntimeError):
    """A package this module wrote that fails bioimage.io's own model test (nothing was written)."""


def require(extra: str, what: str, modules: Sequence[str] | None = None) -> None:
    """Import the libraries of ``extra`` (or ``modules``), or raise an :class:`InputError`
    that names the extra to install.

    >>> require("onnx", "ONNX export", modules=["json"])
    >>> require("onnx", "ONNX export", modules=["no_such_module_here"])
    Traceback (most recent call last):
    ...
    service.errors.InputError: ONNX export needs no_such_module_here, which is not installed: pip install 'unet-tile[onnx]'
    """
    for name in modules if modules is not None else _EXTRAS[extra]:
        try:
            importlib.import_module(name)
        except ImportError:
            raise InputError(f"{what} needs {name}, which is not installed: pip install 'unet-tile[{extra}]'") from None


def export_torchscript(checkpoint: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """The checkpoint's network as TorchScript at ``path`` (atomically)."""
    return unet_export.export_torchscript(checkpoint.model, path)


def export_onnx(
    checkpoint: Checkpoint, path: str | os.PathLike[str], *, opset: int = unet_export.DEFAULT_OPSET
) -> Path:
    """The checkpoint's network as ONNX at ``path`` (atomically); needs the ``onnx`` extra."""
    require("onnx", "ONNX export")
    return unet_export.export_onnx(checkpoint.model, path, opset=opset)


# --- the package --------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageCheck:
    """What ``bioimageio.core.test_model`` said: its overall status and each check's."""

    status: str  # "passed" or "failed" (or "valid-format": valid, but no test ran)
    checks: tuple[tuple[str, str], ...]  # (name, status) of each check, in order
    errors: tuple[str, ...]  # "check: message" of each error
    warnings: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@contextmanager
def _quiet_bioimageio() -> Iterator[None]:
    """Calls into bioimage.io's libraries: their loggers (loguru) quiet unless this module's logger
    is at DEBUG, and two warnings that are theirs to fix filtered: ``bioimageio.core`` loads
    TorchScript with ``torch.jit.load`` (deprecated in torch 2.13) and leaves files it read open."""
    from loguru import logger  # noqa: PLC0415 - a dependency of bioimageio.spec

    verbose = log.isEnabledFor(logging.DEBUG)
    if not verbose:
        logger.disable("bioimageio")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
            warnings.filterwarnings("ignore", "unclosed file", ResourceWarning)
            try:
                yield
            finally:
                gc.collect()  # what bioimageio left open in reference cycles is closed here, not in a later caller
    finally:
        if not verbose:
            logger.enable("bioimageio")


def check_package(path: str | os.PathLike[str]) -> PackageCheck:
    """Run ``bioimageio.core.test_model`` on the package at ``path``: the description's
    validation, the test outputs reproduced from the test inputs with every weights format,
    and inference at several sizes and batch sizes. Needs the ``bioimageio`` extra.

    It seeds torch's and numpy's global random generators (``determinism="seed_only"``).
    """
    require("bioimageio", "testing a bioimage.io package")
    import bioimageio.core  # noqa: PLC0415

    with _quiet_bioimageio():
        summary = bioimageio.core.test_model(Path(path), devices=["cpu"])
    checks = tuple((d.name, d.status) for d in summary.details)
    errors = tuple(f"{d.name}: {e.msg}" for d in summary.details for e in d.errors)
    warns = tuple(f"{d.name}: {w.msg}" for d in summary.details for w in d.warnings)
    return PackageCheck(str(summary.status), checks, errors, warns)


def _safe_name(text: str) -> str:
    """A bioimage.io resource name: letters, digits, ``_+- ()``, 5 to 64 characters.

    >>> _safe_name("unet-tile demo-nuclei.v2")
    'unet-tile demo-nuclei-v2'
    """
    name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", text).strip()[:64]
    return name if len(name) >= 5 else f"unet-tile {name}".strip()


def _valid_crop(image: npt.NDArray[Any], depth: int) -> npt.NDArray[Any]:
    """The central window of a (C, H, W) image at the test size (or the largest valid size that fits)."""
    want = geometry.nearest_valid_input_sizes(1, depth)[1] + _TEST_STEPS * geometry.pooling_period(depth)
    sides = []
    for n in image.shape[-2:]:
        below, _ = geometry.nearest_valid_input_sizes(min(n, want), depth)
        if below is None:
            raise InputError(f"the sample image is {image.shape[-2:]} px; a side needs at least {_sizes(depth, 0)} px")
        sides.append(below)
    top, left = (image.shape[-2] - sides[0]) // 2, (image.shape[-1] - sides[1]) // 2
    return np.asarray(image[:, top : top + sides[0], left : left + sides[1]])


def _sizes(depth: int, n: int) -> int:
    return geometry.nearest_valid_input_sizes(1, depth)[1] + n * geometry.pooling_period(depth)


def _synthetic_sample(config: UNetConfig) -> npt.NDArray[Any]:
    side = _sizes(config.depth, _TEST_STEPS)
    image = synth_image(np.random.default_rng(2015), (side, side), dtype="uint16").image
    return np.repeat(image[None], config.in_channels, axis=0)  # (C, H, W): the same plane in every channel


def _preprocess(x: npt.NDArray[np.float32], normalization: Normalization) -> npt.NDArray[np.float32]:
    """A (1, C, H, W) float32 input as bioimage.io's preprocessing of it (what ``bioimageio.core``
    computes: percentiles of every pixel, numpy's linear method, ``+ eps``), not ours (a strided
    sample and ``max(hi - lo, 1e-6)``): the test output must be what the package describes."""
    out = np.empty_like(x)
    for c in range(x.shape[1]):
        plane = x[0, c].astype(np.float64)
        if normalization.method == "percentile":
            lo, hi = np.percentile(plane, [normalization.low, normalization.high])
            out[0, c] = (plane - lo) / (hi - lo + _EPS)
        else:
            out[0, c] = (plane - normalization.mean[c]) / (normalization.std[c] + _EPS)
    return out


def _logits(model: UNet, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        weights = next(model.parameters())
        out = model(torch.from_numpy(x).to(weights.device, torch.float32))
    return np.asarray(out.float().cpu().numpy(), np.float32)


_PALETTE = np.array(
    [[0, 0, 0], [46, 204, 113], [231, 76, 60], [52, 152, 219], [241, 196, 15], [155, 89, 182], [230, 126, 34]],
    np.uint8,
)


def _cover(
    raw: npt.NDArray[np.float32], logits: npt.NDArray[np.float32], normalization: Normalization
) -> npt.NDArray[np.uint8]:
    """A 2:1 RGB picture: the input's first channel (the part the output covers) | the labels."""
    labels = logits[0].argmax(axis=0)
    h, w = labels.shape
    top, left = (raw.shape[-2] - h) // 2, (raw.shape[-1] - w) // 2
    window = raw[0, :, top : top + h, left : left + w]
    gray = (normalization.fit(window).stretch(window)[0] * 255).astype(np.uint8)
    colors = _PALETTE[1:][(labels - 1) % (len(_PALETTE) - 1)]
    colors[labels == 0] = _PALETTE[0]
    picture = np.concatenate([np.repeat(gray[..., None], 3, axis=-1), colors], axis=1)  # (h, 2w, 3)
    scale = max(1, 512 // (2 * w))
    return np.asarray(picture.repeat(scale, axis=0).repeat(scale, axis=1))


def _readme(
    checkpoint: Checkpoint, name: str, source: str | None, result: Mapping[str, Any], normalization: Normalization
) -> str:
    c = checkpoint.config
    margin = geometry.context_margin(c.depth)
    smallest, period = _sizes(c.depth, 0), geometry.pooling_period(c.depth)
    held = checkpoint.info.get("held_out")
    held_lines = (
        [
            f"On {int(held.get('images', 0))} held-out images the training run measured foreground Dice "
            f"{held.get('dice')}, IoU {held.get('iou')} and instance F1 at IoU 0.5 {held.get('f1')} "
            "(through unet-tile's own tiling, which is exact for a valid-padding network)."
        ]
        if isinstance(held, Mapping)
        else ["The checkpoint carries no held-out evaluation; validate it on your own annotated images."]
    )
    if normalization.method == "percentile":
        norm = (
            f"per image and channel, percentile {normalization.low:g} maps to 0 and percentile "
            f"{normalization.high:g} to 1 (`scale_range` over y and x). bioimage.io computes "
            "`(x - lo) / (hi - lo + 1e-6)` from the percentiles of every pixel; unet-tile computes "
            "`(x - lo) / max(hi - lo, 1e-6)` from the same percentiles of the whole image (never per tile) for "
            "images up to 4M pixels per channel, and from a strided sample of 4M pixels of larger ones, after "
            "mapping NaN/inf pixels into the fitted range. The epsilon changes normalized values by about "
            "1e-6 / (hi - lo) relative: nothing on real images."
        )
    else:
        norm = (
            f"`(x - mean) / std` with mean {list(normalization.mean)} and std {list(normalization.std)} per channel "
            "(`fixed_zero_mean_unit_variance`; bioimage.io divides by `std + 1e-6`)."
        )
    tested = (
        "`bioimageio.core`'s model test reproduced it with the TorchScript and the ONNX weights, and ran both at "
        "several sizes and batch sizes, before unet-tile wrote the package."
        if result["tested"]
        else "This package was written without running `bioimageio.core`'s model test (`--no-test`)."
    )
    training = {k: checkpoint.info[k] for k in ("command", "steps", "train", "data") if k in checkpoint.info}
    lines = [
        f"# {name}",
        "",
        f"A valid-padding 2D U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), depth {c.depth}, base width "
        f"{c.base_width}, {'batch norm, ' if c.batch_norm else ''}{checkpoint.model.num_parameters():,} parameters, "
        f"exported by unet-tile from checkpoint {source or '(in memory)'} (sha256 `{checkpoint.sha256[:16]}`).",
        "",
        "## Inputs and outputs",
        "",
        f"- input `{unet_export.INPUT_NAME}`: (batch, channel, y, x), float32, {c.in_channels} channel"
        f"{'s' if c.in_channels > 1 else ''}; y and x each {smallest} + n * {period} pixels (n = 0, 1, 2, ...).",
        f"- output `{unet_export.OUTPUT_NAME}`: (batch, class, y, x) logits, float32, {2 * margin} px smaller on each "
        f"axis than the input ({margin} px of context consumed on every side, no padding anywhere: tiles on a "
        f"{period}-px grid overlapping by {2 * margin} px stitch without seams).",
        f"- classes: {', '.join(f'{i} `{n}`' for i, n in enumerate(checkpoint.class_names))}; "
        f"foreground: {', '.join(checkpoint.class_names[i] for i in checkpoint.foreground) or 'none'}. "
        "A pixel's label is the argmax over the classes. No postprocessing is described: the output is the "
        "logits (softmax over the classes gives probabilities with the same argmax).",
        "",
        "## Preprocessing",
        "",
        f"Normalization: {norm}",
        "",
        "## Validation",
        "",
        *held_lines,
        "",
        f"The package's test input is {'a synthetic nuclei image' if result['synthetic'] else 'the central window of a sample image'} "
        f"({result['test_shape'][-2]} x {result['test_shape'][-1]} px); its test output is the checkpoint's network "
        f"at fp32 on it, after the preprocessing above as bioimage.io computes it. {tested}",
        "",
        *(["## Training", "", "```json", json.dumps(training, indent=1), "```", ""] if training else []),
        "## Using it",
        "",
        "- deepImageJ (Fiji) and QuPath: the TorchScript weights; keep tiles at the valid sizes above.",
        f"- ONNX Runtime: the ONNX weights (opset {result['opset']}), input `raw`, output `logits`.",
        "- unet-tile: `unet-tile import PACKAGE -o model.safetensors` rebuilds the checkpoint (the weights are read "
        "from the TorchScript archive without running it).",
        "",
    ]
    return "\n".join(lines)


def _descr(
    checkpoint: Checkpoint,
    work: Path,
    *,
    name: str,
    authors: Sequence[str],
    license: str,
    tags: Sequence[str],
    opset: int,
) -> ModelDescr:
    """The model description of the files in ``work``, built with bioimageio.spec's classes."""
    import torch as _torch  # noqa: PLC0415 - the version written is the one that traced
    from bioimageio.spec.model import v0_5 as bio  # noqa: PLC0415

    c = checkpoint.config
    margin = geometry.context_margin(c.depth)
    raw_id, logits_id = bio.TensorId(unet_export.INPUT_NAME), bio.TensorId(unet_export.OUTPUT_NAME)
    y, x = bio.AxisId("y"), bio.AxisId("x")
    size = bio.ParameterizedSize(min=_sizes(c.depth, 0), step=geometry.pooling_period(c.depth))
    norm = checkpoint.normalization
    if norm.method == "percentile":
        scale: Any = bio.ScaleRangeDescr(
            kwargs=bio.ScaleRangeKwargs(axes=[y, x], min_percentile=norm.low, max_percentile=norm.high)
        )
    else:
        scale = bio.FixedZeroMeanUnitVarianceDescr(
            kwargs=bio.FixedZeroMeanUnitVarianceAlongAxisKwargs(
                mean=list(norm.mean), std=list(norm.std), axis=bio.AxisId("channel")
            )
        )
    to_float = bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))
    inputs = [
        bio.InputTensorDescr(
            id=raw_id,
            description="raw image, any intensity range (normalized by the preprocessing)",
            axes=[
                bio.BatchAxis(),
                bio.ChannelAxis(channel_names=[f"channel{i}" for i in range(c.in_channels)]),
                bio.SpaceInputAxis(id=y, size=size),
                bio.SpaceInputAxis(id=x, size=size),
            ],
            test_tensor=bio.FileDescr(source=work / "test_input.npy"),
            sample_tensor=bio.FileDescr(source=work / "sample_input.tif"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[to_float, scale, to_float],
        )
    ]
    outputs = [
        bio.OutputTensorDescr(
            id=logits_id,
            description=f"class logits; label = argmax over the classes; {2 * margin} px smaller than the input",
            axes=[
                bio.BatchAxis(),
                bio.ChannelAxis(channel_names=list(checkpoint.class_names)),
                bio.SpaceOutputAxis(id=y, size=bio.SizeReference(tensor_id=raw_id, axis_id=y, offset=-2 * margin)),
                bio.SpaceOutputAxis(id=x, size=bio.SizeReference(tensor_id=raw_id, axis_id=x, offset=-2 * margin)),
            ],
            test_tensor=bio.FileDescr(source=work / "test_output.npy"),
            sample_tensor=bio.FileDescr(source=work / "sample_output.tif"),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
        )
    ]
    traced = f"traced by unet-tile (torch.jit.trace) from checkpoint sha256 {checkpoint.sha256}"
    weights = bio.WeightsDescr(
        torchscript=bio.TorchscriptWeightsDescr(
            source=work / "weights_torchscript.pt", pytorch_version=bio.Version(_torch.__version__), comment=traced
        ),
        onnx=bio.OnnxWeightsDescr(
            source=work / "weights.onnx",
            opset_version=opset,
            parent="torchscript",  # the spec wants one original; both come from the same checkpoint
            comment="exported by unet-tile (torch.onnx, torch.export-based) from the same checkpoint; "
            "BatchNormalization left unfolded",
        ),
    )
    ours = {
        "format": "unet-tile",
        "unet": c.to_dict(),
        "class_names": list(checkpoint.class_names),
        "foreground": list(checkpoint.foreground),
        "normalization": norm.to_dict(),
        "instances": checkpoint.instances,
        "size": checkpoint.size.to_dict() if checkpoint.size is not None else None,
        "checkpoint_sha256": checkpoint.sha256,
        "info": checkpoint.info,
    }
    config = bio.Config.model_validate(
        {
            "bioimageio": bio.BioimageioConfig(
                architecture_type="U-Net (valid padding)",
                architecture_description=f"Ronneberger et al. 2015 U-Net: depth {c.depth}, base width "
                f"{c.base_width}, unpadded 3x3 convolutions{' with batch norm' if c.batch_norm else ''}, "
                "2x2 max-pooling, 2x2 up-convolutions, crop-and-concat skips, 1x1 head",
                model_parameter_count=checkpoint.model.num_parameters(),
                task="semantic segmentation",
            ),
            _CONFIG_KEY: json.loads(json.dumps(ours)),  # plain JSON values only
        }
    )
    return bio.ModelDescr(
        name=name,
        description=(
            f"Valid-padding 2D U-Net (depth {c.depth}, width {c.base_width}), {c.num_classes} classes "
            f"({', '.join(checkpoint.class_names)}); output = input - {2 * margin} px per axis. Exported by unet-tile."
        )[:512],
        authors=[bio.Author(name=a) for a in authors],
        cite=[
            bio.CiteEntry(
                text="Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image "
                "Segmentation. MICCAI 2015",
                doi=bio.Doi(CITATION_DOI),
            )
        ],
        license=bio.LicenseId(license),
        tags=sorted({"unet", "2d", "pytorch", "onnx", "torchscript", "semantic-segmentation", "valid-padding", *tags}),
        documentation=bio.FileDescr(source=work / "README.md"),
        covers=[bio.FileDescr(source=work / "cover.png")],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config=config,
    )


def export_bioimageio(
    checkpoint: Checkpoint,
    path: str | os.PathLike[str],
    *,
    source: str | None = None,
    name: str | None = None,
    authors: Sequence[str] = (),
    license: str = "MIT",
    tags: Sequence[str] = (),
    sample: npt.NDArray[Any] | None = None,
    opset: int = unet_export.DEFAULT_OPSET,
    test: bool = True,
) -> PackageCheck | None:
    """Write the checkpoint as a bioimage.io model package (zip) at ``path``, atomically.

    ``source``: the checkpoint's file name, for the README; ``name``: the resource's name
    (default ``unet-tile <checkpoint stem>``); ``authors`` (default "unet-tile contributors"),
    ``license`` (an SPDX id), extra ``tags``; ``sample``: a (C, H, W) raw image whose central
    valid window becomes the test input and cover (default: a synthetic nuclei image).
    ``test``: run :func:`check_package` on the package first and write nothing unless it
    passes (:class:`PackageTestError`); the result is returned (None without ``test``).
    """
    require("bioimageio", "a bioimage.io package")
    import imageio.v3 as iio  # noqa: PLC0415
    from bioimageio.spec import save_bioimageio_package  # noqa: PLC0415

    _check_metadata(license, authors)  # before the minutes of work, not after
    config = checkpoint.config
    synthetic = sample is None
    raw = _valid_crop(_synthetic_sample(config) if sample is None else np.asarray(sample), config.depth)
    if raw.ndim != 3 or raw.shape[0] != config.in_channels:
        raise InputError(f"the sample image must have {config.in_channels} channel(s), got shape {raw.shape}")
    test_input = raw[None].astype(np.float32)  # (1, C, H, W)
    model = _fp32_cpu(checkpoint.model)
    test_output = _logits(model, _preprocess(test_input, checkpoint.normalization))
    title = _safe_name(name or f"unet-tile {Path(source).stem if source else 'model'}")
    with tempfile.TemporaryDirectory(prefix="unet-tile-export-") as tmp:
        work = Path(tmp)
        unet_export.export_torchscript(model, work / "weights_torchscript.pt")
        unet_export.export_onnx(model, work / "weights.onnx", opset=opset)
        np.save(work / "test_input.npy", test_input)
        np.save(work / "test_output.npy", test_output)
        tifffile.imwrite(work / "sample_input.tif", test_input[0], photometric="minisblack", metadata={"axes": "CYX"})
        tifffile.imwrite(work / "sample_output.tif", test_output[0], photometric="minisblack", metadata={"axes": "CYX"})
        iio.imwrite(work / "cover.png", _cover(test_input, test_output, checkpoint.normalization))
        facts = {"synthetic": synthetic, "test_shape": test_input.shape, "opset": opset, "tested": test}
        (work / "README.md").write_text(_readme(checkpoint, title, source, facts, checkpoint.normalization))
        with _quiet_bioimageio():
            try:
                descr = _descr(
                    checkpoint,
                    work,
                    name=title,
                    authors=list(authors) or ["unet-tile contributors"],
                    license=license,
                    tags=tags,
                    opset=opset,
                )
            except ValueError as e:  # pydantic's ValidationError: an option the spec refuses (license, author)
                raise InputError(f"the bioimage.io description is invalid: {_first_error(e)}") from None
            package = work / "package.zip"
            save_bioimageio_package(descr, output_path=package)
        result = check_package(package) if test else None
        if result is not None and not result.passed:
            raise PackageTestError(
                f"the package fails bioimage.io's model test: {'; '.join(result.errors) or result.status}"
            )
        with atomic_path(path) as part:
            shutil.copyfile(package, part)
    return result


def _check_metadata(license: str, authors: Sequence[str]) -> None:
    from bioimageio.spec.model import v0_5 as bio  # noqa: PLC0415

    try:
        bio.LicenseId(license)
    except ValueError:
        raise InputError(
            f"unknown license {license!r}: give an SPDX license id (MIT, BSD-3-Clause, CC-BY-4.0, ...)"
        ) from None
    for name in authors:
        try:
            bio.Author(name=name)
        except ValueError as e:
            raise InputError(f"author {name!r}: {_first_error(e)}") from None


def _first_error(e: ValueError) -> str:
    """The first of a pydantic ValidationError's errors, in one line."""
    errors = getattr(e, "errors", None)
    if callable(errors) and (found := errors()):
        where = ".".join(str(part) for part in found[0].get("loc", ()))
        text = f"{where}: {found[0].get('msg', '')} (input {found[0].get('input')!r})"
    else:
        text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _fp32_cpu(model: UNet) -> UNet:
    copy = UNet(model.config)
    copy.load_state_dict(model.state_dict(), strict=True)
    return copy.to("cpu", torch.float32).eval()


# --- import -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedPackage:
    """What :func:`import_bioimageio` wrote, and from what."""

    path: Path
    sha256: str
    weights_format: str
    config: UNetConfig
    class_names: tuple[str, ...]
    normalization: Normalization
    max_abs_diff: float  # the rebuilt network vs the package's test output
    name: str


class _Files:
    """The files of a package, a zip or a folder, read by their relative names (never outside it)."""

    def __init__(self, package: Path) -> None:
        self.package = package
        self.zip: zipfile.ZipFile | None = None
        self.root_dir = package if package.is_dir() else package.parent
        if package.is_file() and zipfile.is_zipfile(package):
            self.zip = zipfile.ZipFile(package)

    def read(self, source: Any, what: str) -> bytes:
        text = str(source)
        if re.match(r"[a-z][a-z0-9+.-]*://", text, re.I):
            raise InputError(
                f"{self.package}: the {what} is at {text}; nothing is downloaded: use a package that holds its files"
            )
        rel = PurePosixPath(text.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"{self.package}: the {what} ({text}) must be a file inside the package")
        try:
            if self.zip is not None:
                return self.zip.read(str(rel))
            return (self.root_dir / rel).read_bytes()
        except (KeyError, FileNotFoundError):
            raise InputError(f"{self.package}: the package lacks its {what} ({text})") from None

    def description(self) -> ModelDescr:
        """The package's model description (converted to the latest format), validated without file
        checks (this class reads and hashes the files it needs); a zip is read through our own handle,
        which bioimageio.spec would otherwise open and leave open."""
        from bioimageio.spec import load_model_description  # noqa: PLC0415

        try:
            return load_model_description(
                self.zip if self.zip is not None else self.package, format_version="latest", perform_io_checks=False
            )
        except Exception as e:  # the spec raises ValueError for an invalid description, others for unreadable files
            reason = " ".join(str(e).split())[:300]
            raise InputError(f"{self.package}: not a valid bioimage.io model package ({reason})") from None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _normalization(descr: ModelDescr, in_channels: int) -> Normalization:
    """Our :class:`Normalization` from the input's preprocessing (percentiles per channel over y and x,
    or fixed mean/std per channel); anything else is refused."""
    steps = [p for p in descr.inputs[0].preprocessing if p.id != "ensure_dtype"]
    supported = "unet-tile reads scale_range (percentiles per channel over y and x) or fixed_zero_mean_unit_variance"
    if len(steps) != 1:
        raise InputError(f"input preprocessing {[p.id for p in steps]} is not one normalization; {supported}")
    step = steps[0]
    kw: Any = step.kwargs
    if step.id == "scale_range":
        axes = None if kw.axes is None else {str(a) for a in kw.axes}
        if not (axes == {"y", "x"} or (axes is None and in_channels == 1)):
            raise InputError(f"scale_range over axes {sorted(axes or ['all'])}; {supported}")
        if kw.reference_tensor is not None and str(kw.reference_tensor) != str(descr.inputs[0].id):
            raise InputError(f"scale_range with reference_tensor {kw.reference_tensor}; {supported}")
        return Normalization(method="percentile", low=float(kw.min_percentile), high=float(kw.max_percentile))
    if step.id == "fixed_zero_mean_unit_variance":
        mean = list(kw.mean) if isinstance(kw.mean, list) else [kw.mean] * in_channels
        std = list(kw.std) if isinstance(kw.std, list) else [kw.std] * in_channels
        if len(mean) != in_channels or getattr(kw, "axis", "channel") != "channel":
            raise InputError(f"fixed_zero_mean_unit_variance along {getattr(kw, 'axis', None)}; {supported}")
        return Normalization(method="fixed", mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    raise InputError(f"input preprocessing {step.id!r}; {supported}")


def _check_axes(descr: ModelDescr, config: UNetConfig) -> bool:
    """The tensors are our network's: one input (batch, channel, y, x), one output of
    (batch, class, y, x) = input - 2*margin; returns whether the output is softmaxed."""
    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise InputError(f"{len(descr.inputs)} inputs and {len(descr.outputs)} outputs; a U-Net has one of each")
    ipt, out = descr.inputs[0], descr.outputs[0]
    for tensor in (ipt, out):
        ids = [str(a.id) for a in tensor.axes]
        if ids != ["batch", "channel", "y", "x"]:
            raise InputError(f"tensor {tensor.id} has axes {ids}; unet-tile's U-Net takes (batch, channel, y, x)")
    margin = geometry.context_margin(config.depth)
    for axis in out.axes[2:]:
        ref = axis.size
        ok = (
            type(ref).__name__ == "SizeReference"
            and str(getattr(ref, "tensor_id", "")) == str(ipt.id)
            and str(getattr(ref, "axis_id", "")) == str(axis.id)
            and getattr(ref, "offset", None) == -2 * margin
            and getattr(axis, "halo", 0) == 0
        )
        if not ok:
            raise InputError(
                f"output axis {axis.id} is not the input's size - {2 * margin} (a valid-padding U-Net of depth "
                f"{config.depth} as unet-tile builds it): {ref}"
            )
    steps = [p.id for p in out.postprocessing if p.id != "ensure_dtype"]
    if steps not in ([], ["softmax"]):
        raise InputError(
            f"output postprocessing {steps}; unet-tile labels by argmax of logits: supported none or softmax"
        )
    return steps == ["softmax"]


def _state(files: _Files, descr: ModelDescr, weights: str) -> tuple[str, dict[str, torch.Tensor]]:
    available = [f for f, entry in descr.weights if entry is not None]
    order = _WEIGHTS if weights == "auto" else (weights,)
    chosen = next((f for f in order if f in available), None)
    if chosen is None:
        why = (
            " (pytorch_state_dict needs the package's Python architecture code, which unet-tile never runs)"
            if "pytorch_state_dict" in available
            else ""
        )
        raise InputError(
            f"{files.package} has {', '.join(available)} weights; unet-tile imports {' or '.join(order)} weights{why}"
        )
    entry: Any = getattr(descr.weights, chosen)
    data = files.read(entry.source, f"{chosen} weights")
    if entry.sha256 is not None and hashlib.sha256(data).hexdigest() != str(entry.sha256):
        raise InputError(f"{files.package}: the {chosen} weights do not match their sha256 in the description")
    if chosen == "torchscript":
        return chosen, unet_export.torchscript_state_dict(data)
    require("onnx", "importing ONNX weights", modules=["onnx"])
    if getattr(entry, "external_data", None) is None:
        return chosen, unet_export.onnx_state_dict(data)
    with tempfile.TemporaryDirectory(prefix="unet-tile-import-") as tmp:
        extra = entry.external_data
        (Path(tmp) / PurePosixPath(str(extra.source)).name).write_bytes(files.read(extra.source, "ONNX external data"))
        (Path(tmp) / "model.onnx").write_bytes(data)
        return chosen, unet_export.onnx_state_dict(Path(tmp) / "model.onnx")


def _ours(descr: ModelDescr) -> dict[str, Any]:
    extra = descr.config.model_extra or {}
    value = extra.get(_CONFIG_KEY)
    return dict(value) if isinstance(value, Mapping) else {}


def _test_arrays(files: _Files, descr: ModelDescr) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    arrays = []
    for tensor, what in ((descr.inputs[0], "test input"), (descr.outputs[0], "test output")):
        if tensor.test_tensor is None:
            raise InputError(f"{files.package}: the description names no {what} tensor")
        try:
            arrays.append(np.load(io.BytesIO(files.read(tensor.test_tensor.source, what)), allow_pickle=False))
        except ValueError as e:
            raise InputError(f"{files.package}: the {what} is not a .npy array ({e})") from None
    return arrays[0], arrays[1]


def _tolerance(descr: ModelDescr, weights: str) -> tuple[float, float, float]:
    for tol in descr.config.bioimageio.reproducibility_tolerance:
        if not tol.weights_formats or weights in tol.weights_formats:
            return tol.relative_tolerance, tol.absolute_tolerance, tol.mismatched_elements_per_million
    return 1e-3, 1e-3, 100.0  # bioimage.io's defaults


def import_bioimageio(
    package: str | os.PathLike[str], output: str | os.PathLike[str], *, weights: str = "auto"
) -> ImportedPackage:
    """Write the bioimage.io model ``package`` (a zip, a folder, or its ``rdf.yaml``) as a
    unet-tile checkpoint at ``output``.

    ``weights``: ``"torchscript"``, ``"onnx"`` or ``"auto"`` (TorchScript when the package has
    it: it also carries batch norm's step counters). The architecture comes from the package's
    ``config.unet_tile`` (written by :func:`export_bioimageio`) or, without it, from the
    weights' names and shapes; either way the weights must be those of :class:`unet.UNet`,
    loaded strictly, and the rebuilt network must reproduce the package's test output within
    the package's tolerance (bioimage.io's default: 1e-3). Normalization comes from the input's
    preprocessing, class names from the output's channel names. Needs ``bioimageio.spec``
    (the ``bioimageio`` extra) and, for ONNX weights, ``onnx``.
    """
    if weights not in ("auto", *_WEIGHTS):
        raise InputError(f"unknown weights format {weights!r}; choose auto, {', '.join(_WEIGHTS)}")
    require("bioimageio", "importing a bioimage.io package", modules=["bioimageio.spec"])
    src = Path(package)
    if not src.exists():
        raise InputError(f"package not found: {src}")
    with (
        _quiet_bioimageio()
    ):  # the description is released inside: bioimageio.spec leaves the zip it read open till then
        return _import(src, Path(output), weights)


def _import(src: Path, output: Path, weights: str) -> ImportedPackage:
    files = _Files(src)
    try:
        descr = files.description()
        chosen, state = _state(files, descr, weights)
        ours = _ours(descr)
        inferred = unet_export.config_from_state_dict(state)
        config = UNetConfig.from_dict(ours["unet"]) if "unet" in ours else inferred
        if config != inferred:
            raise InputError(f"{src}: config.{_CONFIG_KEY} describes {config}, the weights are {inferred}")
        expected = UNet(config).state_dict()
        if chosen == "onnx":  # an ONNX graph holds the parameters, not batch norm's step counters
            state = {k: v for k, v in state.items() if k in expected}
            for k, v in expected.items():
                if k.endswith("num_batches_tracked"):
                    state.setdefault(k, torch.zeros_like(v))
        softmax = _check_axes(descr, config)
        normalization = _normalization(descr, config.in_channels)
        names = tuple(str(n) for n in getattr(descr.outputs[0].axes[1], "channel_names", ()))
        try:
            model = import_state_dict(state, config)
        except CheckpointError as e:
            raise InputError(
                f"{src}: the {chosen} weights are not unet-tile's U-Net ({e})"
                + (
                    "; an ONNX graph must keep the parameters as named initializers (batch norm unfolded)"
                    if chosen == "onnx"
                    else ""
                )
            ) from None
        test_in, test_out = _test_arrays(files, descr)
        diff = _reproduce(model, test_in, test_out, normalization, softmax, _tolerance(descr, chosen), src)
    finally:
        files.close()
    foreground = tuple(int(i) for i in ours.get("foreground", range(1, config.num_classes)))
    info = dict(ours.get("info") or {})
    info["imported_from"] = {
        "package": str(src),
        "package_sha256": file_sha256(src) if src.is_file() else None,
        "name": descr.name,
        "id": None if descr.id is None else str(descr.id),
        "format_version": descr.format_version,
        "weights": chosen,
        "checkpoint_sha256": ours.get("checkpoint_sha256"),
        "test_output_max_abs_diff": diff,
    }
    instances = ours.get("instances")
    size = ours.get("size")
    sha = save_checkpoint(
        output,
        model,
        normalization=normalization,
        class_names=names,
        foreground=foreground,
        info=info,
        instances=instances if isinstance(instances, Mapping) else None,
        size=ObjectSize.from_dict(size) if isinstance(size, Mapping) else None,
    )
    return ImportedPackage(output, sha, chosen, config, names, normalization, diff, descr.name)


def _reproduce(
    model: UNet,
    test_in: npt.NDArray[Any],
    test_out: npt.NDArray[Any],
    normalization: Normalization,
    softmax: bool,
    tolerance: tuple[float, float, float],
    src: Path,
) -> float:
    """Max abs difference of the rebuilt network's output on the test input from the test output;
    refused beyond the package's tolerance."""
    if test_in.ndim != 4 or test_in.shape[0] != 1:
        raise InputError(f"{src}: test input of shape {test_in.shape}; expected (1, C, Y, X)")
    try:
        got = _logits(model, _preprocess(test_in.astype(np.float32), normalization))
    except UNetError as e:
        raise InputError(f"{src}: the test input does not fit the network ({e})") from None
    if softmax:
        got = np.asarray(torch.softmax(torch.from_numpy(got), dim=1).numpy())
    if got.shape != test_out.shape:
        raise InputError(
            f"{src}: the rebuilt network gives {got.shape} on the test input, the package {test_out.shape}"
        )
    rtol, atol, ppm = tolerance
    want = test_out.astype(np.float32)
    bad = np.abs(got - want) > atol + rtol * np.abs(want)
    diff = float(np.abs(got - want).max())
    if bad.sum() > ppm * 1e-6 * bad.size:
        raise InputError(
            f"{src}: the rebuilt U-Net does not reproduce the package's test output ({int(bad.sum())} of {bad.size} "
            f"values off, max abs difference {diff:.3g}): not the network unet-tile builds"
        )
    return diff
