"""Self-describing checkpoints: one safetensors file with its own metadata.

The file carries the format name and version, the :class:`~unet.UNetConfig`, the input
:class:`~unet.Normalization`, the class names (and which of them are foreground), free
training provenance, and the weights. Loading never unpickles anything: safetensors holds
only raw tensors plus a JSON header, and plain PyTorch files are read with
``torch.load(weights_only=True)``. Keys and shapes are checked strictly; any mismatch or
corruption raises :class:`~unet.errors.CheckpointError` saying what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .errors import CheckpointError
from .model import UNet, UNetConfig
from .normalization import Normalization
from .size import ObjectSize

__all__ = [
    "DEMO_CHECKPOINT",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "file_sha256",
    "import_state_dict",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT_NAME = "unet-tile"
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "demo-nuclei.safetensors"
FORMAT_VERSION = 1
_WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model in eval mode plus everything needed to use it."""

    model: UNet
    normalization: Normalization
    class_names: tuple[str, ...]
    foreground: tuple[int, ...]  # class ids that count as "object" (for masks and Dice)
    sha256: str
    format_version: int = FORMAT_VERSION
    info: dict[str, Any] = field(default_factory=dict)  # training provenance, metrics
    instances: dict[str, Any] | None = None  # how class masks become instances (tiling.InstanceRule fields)
    size: ObjectSize | None = None  # the object diameters it was trained for (None: not recorded)

    @property
    def config(self) -> UNetConfig:
        return self.model.config


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_classes(config: UNetConfig, class_names: tuple[str, ...], foreground: tuple[int, ...]) -> None:
    if len(class_names) != config.num_classes:
        raise CheckpointError(
            f"expected {config.num_classes} class names (num_classes), got {len(class_names)}: {list(class_names)}"
        )
    bad = [i for i in foreground if not 0 <= i < config.num_classes]
    if bad:
        raise CheckpointError(f"foreground class ids {bad} outside 0..{config.num_classes - 1}")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: UNet,
    *,
    normalization: Normalization | None = None,
    class_names: tuple[str, ...] | list[str] | None = None,
    foreground: tuple[int, ...] | list[int] | None = None,
    info: Mapping[str, Any] | None = None,
    weights_dtype: str = "float32",
    instances: Mapping[str, Any] | None = None,
    size: ObjectSize | None = None,
) -> str:
    """Write ``model`` and its metadata atomically to ``path``; return the file's sha256.

    ``weights_dtype='float16'`` halves the file (the loader casts back to float32).
    ``instances``: the instance rule recorded with the model (``tiling.InstanceRule`` fields:
    seeds, grow, min_area, ...), read back as :attr:`Checkpoint.instances`; ``size``: the
    object size it was trained for (:class:`unet.size.ObjectSize`), read back as :attr:`Checkpoint.size`.
    """
    config = model.config
    names = tuple(class_names) if class_names is not None else _default_class_names(config.num_classes)
    fg = tuple(foreground) if foreground is not None else tuple(range(1, config.num_classes))
    _check_classes(config, names, fg)
    if weights_dtype not in _WEIGHT_DTYPES:
        raise CheckpointError(f"weights_dtype must be one of {sorted(_WEIGHT_DTYPES)}, got {weights_dtype!r}")
    dtype = _WEIGHT_DTYPES[weights_dtype]
    tensors = {
        k: (v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)).contiguous()
        for k, v in model.state_dict().items()
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict()),
        "normalization": json.dumps((normalization or Normalization()).to_dict()),
        "class_names": json.dumps(list(names)),
        "foreground": json.dumps(list(fg)),
        "info": json.dumps(dict(info or {})),
    }
    if instances is not None:
        metadata["instances"] = json.dumps(dict(instances))
    if size is not None:
        metadata["size"] = json.dumps(size.to_dict())
    with atomic_path(path) as part:
        save_file(tensors, str(part), metadata=metadata)
    return file_sha256(path)


def _default_class_names(n: int) -> tuple[str, ...]:
    return ("background", "foreground") if n == 2 else tuple(f"class_{i}" for i in range(n))


def _json_field(metadata: Mapping[str, str], key: str, path: Path) -> Any:
    if key not in metadata:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: checkpoint metadata {key!r} is not valid JSON ({e})") from None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    expect: UNetConfig | None = None,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`, strictly.

    ``expect``: a config the caller requires; any field that differs is refused
    ("expected X, got Y") instead of silently building another network.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise CheckpointError(
                    f"{p}: not a {FORMAT_NAME} checkpoint (format {metadata.get('format')!r}); "
                    "use unet.import_state_dict for a plain PyTorch state_dict"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated files
        raise CheckpointError(f"{p}: corrupt or not a safetensors checkpoint ({type(e).__name__}: {e})") from None
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{p}: bad format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{p}: format version {version} is newer than this software reads ({FORMAT_VERSION})")
    try:
        config = UNetConfig.from_dict(_json_field(metadata, "config", p))
        normalization = Normalization.from_dict(_json_field(metadata, "normalization", p))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: invalid metadata ({e})") from None
    if expect is not None and expect != config:
        diffs = [
            f"{k}: expected {v!r}, got {config.to_dict()[k]!r}"
            for k, v in expect.to_dict().items()
            if config.to_dict()[k] != v
        ]
        raise CheckpointError(f"{p}: checkpoint config does not match: {'; '.join(diffs)}")
    names = tuple(str(n) for n in _json_field(metadata, "class_names", p))
    fg = tuple(int(i) for i in _json_field(metadata, "foreground", p))
    _check_classes(config, names, fg)
    model = _build(config, state, str(p))
    model.to(device)
    return Checkpoint(
        model=model,
        normalization=normalization,
        class_names=names,
        foreground=fg,
        sha256=file_sha256(p),
        format_version=version,
        info=dict(_json_field(metadata, "info", p)) if "info" in metadata else {},
        instances=_instances(metadata, p),
        size=_size(metadata, p),
    )


def _size(metadata: Mapping[str, str], path: Path) -> ObjectSize | None:
    if "size" not in metadata:
        return None
    value = _json_field(metadata, "size", path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: checkpoint metadata 'size' must be an object, got {value!r}")
    try:
        return ObjectSize.from_dict(value)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _instances(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    if "instances" not in metadata:
        return None
    value = _json_field(metadata, "instances", path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: checkpoint metadata 'instances' must be an object, got {value!r}")
    return value


def _build(config: UNetConfig, state: Mapping[str, torch.Tensor], source: str) -> UNet:
    """A UNet of ``config`` with ``state`` loaded after a strict key and shape check."""
    model = UNet(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match {config}: {'; '.join(problems)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()


def import_state_dict(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    config: UNetConfig,
) -> UNet:
    """Build a :class:`UNet` from a plain PyTorch ``state_dict`` of this architecture.

    ``source`` is a mapping or a ``.pt``/``.pth`` file, read with ``weights_only=True``
    (no arbitrary unpickling). A file holding ``{"state_dict": ...}`` or
    ``{"model": ...}`` is unwrapped. Save the result with :func:`save_checkpoint`.
    """
    label = "state_dict"
    if isinstance(source, Mapping):
        state: Any = source
    else:
        label = str(source)
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"state_dict file not found: {source}") from None
        except Exception as e:
            raise CheckpointError(
                f"{source}: not a loadable weights-only PyTorch file ({type(e).__name__}: {e})"
            ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{label}: expected a mapping of parameter names to tensors")
    return _build(config, state, label)
