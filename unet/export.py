"""The network for other runtimes: TorchScript and ONNX files, and their tensors read back.

Both files hold the fp32 network in eval mode with batch, height and width left free: a
(B, C, H, W) input whose H and W are valid sizes (:mod:`unet.geometry`; ``16n + 188`` for
depth 4) gives the (B, num_classes, H - 184, W - 184) logits. The graph no longer checks the
input size as :meth:`UNet.check_input` does (a check in Python is not part of a trace), so
whoever runs it keeps to the valid sizes; the bioimage.io description that
:mod:`service.export` writes around them says which.

* :func:`export_torchscript`: ``torch.jit.trace`` of the model, saved with ``torch.jit.save``
  (the format deepImageJ and QuPath load).
* :func:`export_onnx`: the ``torch.export``-based ONNX exporter (needs ``onnxscript``), with the
  sizes as ``torch.export`` dims (``16*ny + 188``), BatchNormalization left unfolded so the
  initializers keep the state-dict names (ONNX Runtime folds it when it loads the graph).

Each file is traced at one size and checked against the eager model at another size and
batch before it is put in place (atomically: a failed export leaves nothing).

* :func:`torchscript_state_dict` and :func:`onnx_state_dict` read the tensors back without
  running anything from the file: the TorchScript archive's ``data.pkl`` is unpickled with a
  whitelist (module objects become inert records, tensors are rebuilt from the archive's
  storages; ``torch.jit.load`` would compile and run the archive's code), and an ONNX file is
  parsed protobuf. :func:`config_from_state_dict` infers the :class:`UNetConfig` from the names
  and shapes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import geometry
from .atomic import atomic_path
from .errors import CheckpointError, UNetError
from .model import UNet, UNetConfig

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "config_from_state_dict",
    "export_onnx",
    "export_torchscript",
    "onnx_state_dict",
    "torchscript_state_dict",
]

INPUT_NAME, OUTPUT_NAME = "raw", "logits"  # the graph's tensor names (ONNX; the bioimage.io tensor ids)
DEFAULT_OPSET = 20  # torch.onnx's default in torch 2.13; ONNX Runtime >= 1.17 runs it
_CHECK_RTOL = _CHECK_ATOL = 1e-3  # exported vs eager: loose, it catches a wrong graph, not rounding


class ExportError(UNetError):
    """An exported graph that does not compute what the model computes (a bug, not bad input)."""


class _Graph(UNet):
    """The UNet without its Python size check (a trace cannot hold it; ``int()`` of a traced
    size would freeze it): same submodules, same state-dict names, same ``forward``."""

    def check_input(self, x: torch.Tensor) -> None:
        return None


def _graph(model: UNet) -> _Graph:
    graph = _Graph(model.config)
    graph.load_state_dict(model.state_dict(), strict=True)
    return graph.to("cpu", torch.float32).eval()


def _sizes(depth: int, n: int) -> int:
    """The ``n``-th valid input size (``n = 0``: the smallest).

    >>> _sizes(4, 0), _sizes(4, 2)
    (188, 220)
    """
    return geometry.nearest_valid_input_sizes(1, depth)[1] + n * geometry.pooling_period(depth)


def _example(config: UNetConfig, batch: int, ny: int, nx: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)  # its own generator: the caller's random state is left alone
    shape = (batch, config.in_channels, _sizes(config.depth, ny), _sizes(config.depth, nx))
    return torch.randn(shape, generator=g)


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    # TorchScript is what deepImageJ and QuPath load; torch 2.13 marks torch.jit.trace/save as
    # deprecated, and its ONNX exporter trips a pytree FutureWarning of its own: neither is ours to fix
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
        yield


def _check(name: str, got: np.ndarray[Any, Any], want: torch.Tensor) -> None:
    expected = want.detach().numpy()
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=_CHECK_RTOL, atol=_CHECK_ATOL):
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
        raise ExportError(
            f"the exported {name} graph does not reproduce the model: shape {got.shape} vs {expected.shape}, "
            f"max abs difference {diff:.3g}"
        )


def export_torchscript(model: UNet, path: str | os.PathLike[str]) -> Path:
    """Trace ``model`` (fp32, eval, CPU) and save it as TorchScript at ``path``, atomically.

    Traced at the smallest valid size (188 x 188 for depth 4), checked against the model at batch 2 and 204 x 220.
    """
    graph = _graph(model)
    with _quiet_deprecations(), torch.no_grad():
        traced = torch.jit.trace(graph, _example(model.config, 1, 0, 0), check_trace=False)  # type: ignore[no-untyped-call]
        x = _example(model.config, 2, 1, 2)
        _check("TorchScript", traced(x).numpy(), graph(x))
        with atomic_path(path) as part, open(part, "wb") as f:
            torch.jit.save(traced, f)  # through Python's file: a full disk is an OSError, not torch's RuntimeError
    return Path(path)


def export_onnx(model: UNet, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` (fp32, eval) to ONNX at ``path``, atomically; the graph's input is
    :data:`INPUT_NAME`, its output :data:`OUTPUT_NAME`, batch and spatial sizes free.

    Needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (the graph is run once by ONNX Runtime
    at another size and batch than the export's and compared with the model).
    """
    import onnxruntime as ort  # noqa: PLC0415 - optional dependencies, imported when used
    from torch.export import Dim  # noqa: PLC0415

    graph = _graph(model)
    config = model.config
    period, smallest = geometry.pooling_period(config.depth), _sizes(config.depth, 0)
    ny, nx = Dim("ny", min=0), Dim("nx", min=0)
    dims = {"x": {0: Dim("batch", min=1), 2: period * ny + smallest, 3: period * nx + smallest}}
    with _quiet_deprecations(), torch.no_grad(), _quiet_logger("torch.onnx"):
        program = torch.onnx.export(
            graph,
            (_example(config, 2, 2, 3),),  # batch 2 and no size 0/1 root dims: torch.export specializes those
            dynamo=True,
            dynamic_shapes=dims,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            optimize=False,  # keeps BatchNormalization and the state-dict names of its tensors
            verbose=False,
        )
        if program is None:  # only without dynamo=True
            raise ExportError("torch.onnx.export returned no program")
        with atomic_path(path) as part:
            program.save(str(part), external_data=False)
            session = ort.InferenceSession(str(part), providers=["CPUExecutionProvider"])
            x = _example(config, 1, 1, 0)
            _check("ONNX", session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0], graph(x))
    return Path(path)


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Raise a library logger to ERROR for a while (torch.onnx warns that torchvision's ops are not registered)."""
    import logging  # noqa: PLC0415

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- reading tensors back -----------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Record:
    """What a TorchScript module object unpickles to here: its attributes, nothing callable."""


class _Storage:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _TorchScriptUnpickler(pickle.Unpickler):
    """``data.pkl`` of a TorchScript archive with a whitelist: module classes -> :class:`_Record`,
    tensors rebuilt from the archive's ``data/`` storages; any other global is refused."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_Record,), {})
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage, key, _, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        flat = torch.frombuffer(raw, dtype=storage.dtype) if raw else torch.empty(0, dtype=storage.dtype)
        if flat.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key}: {flat.numel()} elements, expected {numel}")
        return flat


def _tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 64:  # a module tree is shallow; a cycle or a hostile file is not
        raise CheckpointError("TorchScript module tree deeper than 64 levels")
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _Record):
            _tensors(value, f"{prefix}{name}.", out, depth + 1)


def torchscript_state_dict(source: str | os.PathLike[str] | bytes) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (a file or its bytes) under their module paths
    (``inc.0.weight``, ...), read without ``torch.jit.load``: nothing in the file is run.

    Raises :class:`~unet.errors.CheckpointError` for anything that is not such an archive.
    """
    label = "TorchScript bytes" if isinstance(source, bytes) else str(source)
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
            names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
            if len(names) != 1:
                raise CheckpointError(f"{label}: not a TorchScript archive (no single <name>/data.pkl)")
            prefix = names[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
                raise CheckpointError(f"{label}: big-endian TorchScript archives are not supported")
            root = _TorchScriptUnpickler(archive.read(names[0]), archive, prefix).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as e:
        raise CheckpointError(f"{label}: unreadable TorchScript archive ({type(e).__name__}: {e})") from None
    except FileNotFoundError:
        raise CheckpointError(f"TorchScript file not found: {label}") from None
    if not isinstance(root, _Record):
        raise CheckpointError(f"{label}: the archive's root is not a module")
    out: dict[str, torch.Tensor] = {}
    _tensors(root, "", out)
    return out


def onnx_state_dict(source: str | os.PathLike[str] | bytes) -> dict[str, torch.Tensor]:
    """The initializers of an ONNX model (a file, with any external data beside it, or its
    bytes) under their names; parsed, not run. Needs ``onnx``."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    label = "ONNX bytes" if isinstance(source, bytes) else str(source)
    try:
        proto = onnx.load_model_from_string(source) if isinstance(source, bytes) else onnx.load(os.fspath(source))
    except FileNotFoundError:
        raise CheckpointError(f"ONNX file not found: {label}") from None
    except Exception as e:  # protobuf's DecodeError, onnx's own errors for external data
        raise CheckpointError(f"{label}: unreadable ONNX model ({type(e).__name__}: {e})") from None
    out: dict[str, torch.Tensor] = {}
    for init in proto.graph.initializer:
        try:
            array = numpy_helper.to_array(init)
        except Exception as e:
            raise CheckpointError(f"{label}: initializer {init.name!r} unreadable ({type(e).__name__}: {e})") from None
        out[init.name] = torch.from_numpy(np.array(array, copy=True))
    return out


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> UNetConfig:
    """The :class:`UNetConfig` whose state-dict names and shapes ``state`` has (the names
    of this package's :class:`UNet`; anything else is refused, saying what is missing).

    >>> config_from_state_dict(UNet(UNetConfig(num_classes=3, depth=2, base_width=4)).state_dict())
    UNetConfig(in_channels=1, num_classes=3, depth=2, base_width=4, batch_norm=True)
    """
    missing = [k for k in ("inc.0.weight", "head.weight") if k not in state]
    if missing:
        raise CheckpointError(f"not the unet-tile U-Net's weights: no {' or '.join(missing)} tensor")
    first, head = state["inc.0.weight"], state["head.weight"]
    if first.ndim != 4 or head.ndim != 4:
        raise CheckpointError(
            f"not the unet-tile U-Net's weights: inc.0.weight {tuple(first.shape)}, head.weight {tuple(head.shape)}"
        )
    levels = {int(m.group(1)) for k in state if (m := re.match(r"downs\.(\d+)\.", k))}
    if not levels or levels != set(range(len(levels))):
        raise CheckpointError(f"not the unet-tile U-Net's weights: encoder levels {sorted(levels)}")
    try:
        return UNetConfig(
            in_channels=int(first.shape[1]),
            num_classes=int(head.shape[0]),
            depth=len(levels),
            base_width=int(first.shape[0]),
            batch_norm="inc.1.running_mean" in state,
        )
    except ValueError as e:
        raise CheckpointError(f"not the unet-tile U-Net's weights ({e})") from None
