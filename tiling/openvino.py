"""The OpenVINO backend: a valid-padding ``nn.Module`` compiled by OpenVINO's CPU plugin.

:class:`OpenVINOPredictor` is a :class:`~tiling.Predictor` like
:class:`~tiling.TorchPredictor`, for the CPU:

* the network (batch norm folded) is converted once per checkpoint to OpenVINO's IR with a
  dynamic (batch, height, width) input and kept in a cache directory, keyed by the
  network's weights and the OpenVINO version (written atomically: a folder renamed into
  place); a later start reads it (~0.1 s) instead of converting (~3 s);
* it is compiled with ``INFERENCE_PRECISION_HINT`` always set (OpenVINO runs bf16 on a CPU
  that has it unless told otherwise): ``fp32`` is ``f32`` and exact (the same logits for a
  pixel whatever the tile, so stitched tiles equal one whole-image pass), ``bf16`` is
  ``bf16``;
* ``int8``: the IR post-training quantized by NNCF (the ``int8`` extra) on calibration
  windows the caller supplies, cached beside it; accuracy figures in docs/performance.md;
* the threads are torch's (``torch.get_num_threads()``), so a process that limits torch's
  threads (a Dask worker) limits OpenVINO's too.

``openvino`` (and ``nncf`` for int8) are imported only when a predictor is made.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from unet.geometry import DEFAULT_DEPTH, input_size, smallest_valid_output_at_least

from .errors import TilingError
from .predictor import cpu_micro_batch, first_width, usable_cores

__all__ = ["Calibration", "OpenVINOPredictor", "openvino_available", "openvino_version"]

log = logging.getLogger(__name__)

_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the quantized ops run int8, the rest f32
_CALIBRATION_FORMAT = 1  # bump when the quantization recipe below changes, so cached int8 IRs are redone

Calibration = Callable[[], Sequence[npt.NDArray[np.float32]]]


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed (it is not imported here)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except ValueError:  # a module set to None in sys.modules (tests simulating its absence)
        return False


def openvino_version() -> str:
    ov = _import("openvino", "openvino")
    return str(ov.__version__)


def _import(name: str, extra: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise TilingError(f"the OpenVINO backend needs the {name!r} package: pip install 'unet-tile[{extra}]'") from e


def _in_channels(module: nn.Module) -> int | None:
    """The first convolution's input channels; None (any) for a network without one."""
    return next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def _state_key(module: nn.Module) -> str:
    """The cache key of a network: its class, parameters and buffers."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class OpenVINOPredictor:
    """Run a valid-padding ``nn.Module`` with OpenVINO on the CPU.

    ``module``: the network (batch norm already folded by the caller if wanted; left as it
    is: a copy is converted); ``precision``: fp32, bf16 or int8 (resolved: not ``auto``);
    ``cache_dir``: where converted networks are kept (None: converted every time), named by a
    hash of the weights (not a checkpoint's sha256: a model changed in memory, as calibration
    and training do, must not find its old conversion); ``calibration``: for int8, a function
    returning normalized (1, C, h, w) windows.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        precision: str = "fp32",
        depth: int | None = None,
        cache_dir: Path | None = None,
        calibration: Calibration | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.backend = "openvino"
        if precision not in _HINTS:
            raise TilingError(f"the OpenVINO backend runs fp32, bf16 or int8, not {precision!r}")
        if precision == "int8" and calibration is None:
            raise TilingError("int8 needs calibration windows")
        self._ov = _import("openvino", "openvino")
        if precision == "int8":
            _import("nncf", "int8")  # before any conversion work: say what is missing at once
        self.precision = precision
        self.device = torch.device("cpu")
        self.depth = depth
        self._width = first_width(module)
        self._in_channels = _in_channels(module)
        self._key = _state_key(module)
        self._cache_dir = cache_dir
        self.num_threads = num_threads or torch.get_num_threads()
        model = self._network(module)
        if precision == "int8":
            assert calibration is not None
            model = self._quantized(model, calibration)
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[precision],  # explicit: the CPU plugin picks bf16 by itself
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": str(self.num_threads),
        }
        core = self._ov.Core()
        self._compiled = core.compile_model(model, "CPU", config)
        self._compiled_labels = core.compile_model(self._with_argmax(model), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._labels_request = self._compiled_labels.create_infer_request()
        self._lock = threading.Lock()  # one infer request each: calls from several threads take turns

    # -- the converted network, cached ---------------------------------------------------

    def _cached(self, variant: str, make: Callable[[], Any]) -> Any:
        """The IR named ``variant`` from the cache, or ``make()``'s, saved there atomically."""
        if self._cache_dir is None:
            return make()
        version = re.sub(r"[^0-9A-Za-z.]+", "_", str(self._ov.__version__))  # '2026.4.1-22982-.../2026/4'
        folder = self._cache_dir / "openvino" / f"{self._key[:32]}-{variant}-ov{version}"
        xml = folder / "model.xml"
        if xml.is_file() and (folder / "model.bin").is_file():
            try:
                return self._ov.Core().read_model(xml)
            except RuntimeError as e:  # a damaged cache entry: rebuild it
                log.warning("cached OpenVINO model %s unreadable (%s); converting again", folder, e)
                shutil.rmtree(folder, ignore_errors=True)
        model = make()
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                # compress_to_fp16=False: the weights stay fp32 (the default would round them to fp16)
                self._ov.save_model(model, scratch / "model.xml", compress_to_fp16=False)
                os.replace(scratch, folder)  # a folder: xml and bin appear together
            except OSError:
                if not xml.is_file():  # not another process's identical copy winning the race
                    raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError as e:
            log.warning("cannot cache the OpenVINO model in %s (%s); converting at every start", folder.parent, e)
        return model

    def _network(self, module: nn.Module) -> Any:
        def convert() -> Any:
            n = input_size(smallest_valid_output_at_least(4, self.depth or DEFAULT_DEPTH), self.depth or DEFAULT_DEPTH)
            example = torch.zeros(1, self._in_channels or 1, n, n)
            shape = self._ov.PartialShape([-1, self._in_channels or -1, -1, -1])
            log.info("converting the network to OpenVINO IR (once per checkpoint)")
            with torch.no_grad(), _warnings_quiet():
                network = copy.deepcopy(module).float().eval()  # the caller's module keeps its dtype and mode
                return self._ov.convert_model(network, example_input=example, input=[shape])

        return self._cached("fp32", convert)

    def _quantized(self, model: Any, calibration: Calibration) -> Any:
        def quantize() -> Any:
            nncf = _import("nncf", "int8")
            windows = list(calibration())
            log.info("quantizing to int8 on %d calibration windows (once per checkpoint)", len(windows))
            return nncf.quantize(
                model,
                nncf.Dataset(windows),
                subset_size=len(windows),
                preset=nncf.QuantizationPreset.MIXED,  # asymmetric activations: ReLU outputs are one-sided
            )

        return self._cached(f"int8c{_CALIBRATION_FORMAT}", quantize)

    def _with_argmax(self, model: Any) -> Any:
        """The network with the class argmax (uint8) as its output, computed by the plugin
        (measured: ~2 ms per 572x572 tile less than numpy's argmax of the logits)."""
        ops = importlib.import_module("openvino.opset13")
        twin = model.clone()  # its own graph: the logits model keeps its one result
        top = ops.topk(twin.output(0).get_node().input_value(0), 1, 1, "max", "none", index_element_type="i32")
        labels = ops.convert(ops.squeeze(top.output(1), [1]), "u8")
        return self._ov.Model([labels], twin.get_parameters(), "unet-tile-labels")

    # -- the Predictor protocol ----------------------------------------------------------

    @property
    def overlap_host_work(self) -> bool:
        """Read the next batch on a worker thread only when OpenVINO's threads leave a core free."""
        return self.num_threads < usable_cores()

    def preferred_batch_size(self, tile_in: tuple[int, int]) -> int:
        # as TorchPredictor's (1 tile at fp32, 2 at bf16/int8 for 572x572; int8 keeps some layers in
        # f32); OpenVINO's speed per tile hardly depends on it (bench, ms/tile at batch 1/2/4: fp32
        # 76/76/77, bf16 17/18/19)
        return cpu_micro_batch(self._width, tile_in, 4 if self.precision == "fp32" else 2)

    def stage(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(x, dtype=np.float32)

    def _infer(self, request: Any, x: Any) -> npt.NDArray[Any]:
        x = self.stage(np.asarray(x))
        step = self.preferred_batch_size((x.shape[-2], x.shape[-1]))
        parts = []
        with self._lock:
            for i in range(0, x.shape[0], step):
                result = request.infer({0: x[i : i + step]})
                parts.append(np.array(result[0], copy=True))  # the request reuses its output buffer
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __call__(self, x: Any) -> npt.NDArray[np.float32]:
        """Per-class probabilities (softmax over the class axis)."""
        logits = self._infer(self._request, x).astype(np.float32, copy=False)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities: npt.NDArray[np.float32] = e / e.sum(axis=1, keepdims=True)
        return probabilities

    def predict_labels(self, x: Any) -> npt.NDArray[np.uint8]:
        """Class ids (the argmax of the logits, taken by OpenVINO)."""
        labels: npt.NDArray[np.uint8] = self._infer(self._labels_request, x)
        return labels

    def __repr__(self) -> str:
        return f"OpenVINOPredictor(precision={self.precision}, threads={self.num_threads})"


@contextlib.contextmanager
def _warnings_quiet() -> Any:
    """The two warnings OpenVINO's PyTorch frontend sets off, on purpose: torch's tracer warns
    about Python control flow on shapes (the model's input checks), which the conversion
    follows for the example only (the IR's shapes stay dynamic), and torch >= 2.10 says
    ``torch.jit.trace`` is deprecated, which is the frontend's business, not a user's."""
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", getattr(torch.jit, "TracerWarning"))  # noqa: B009  (not in torch's stubs)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace(_method)?. is deprecated")
        yield
