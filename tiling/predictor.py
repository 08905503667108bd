"""Adapters from a PyTorch module to the engine's callable: (B, C, h, w) -> (B, K, h', w').

The engine accepts any callable on numpy batches. :class:`TorchPredictor` wraps an
``nn.Module`` (any valid-padding network) for fast inference:

* an inference copy of the module (the caller's module is left as it was) with every
  batch norm that directly follows a convolution folded into that convolution's weights;
* channels-last memory layout and ``inference_mode`` (oneDNN's fastest convolutions on
  the CPU, tensor cores on CUDA; there cuDNN's autotuner is switched on, process-wide,
  since every tile has the same shape);
* optional reduced precision (autocast); ``auto`` picks bf16 where the hardware runs it
  natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX) and fp32 elsewhere;
* on the CPU, batches run as micro-batches that fit the cache (larger ones run slower
  per tile); on CUDA an out-of-memory error halves the tiles per pass and retries;
* on CUDA, batches are staged in pinned memory (by the engine's reader thread) and
  copied with ``non_blocking``; on a CPU whose cores torch's threads all take, the engine
  reads tiles in line instead (:attr:`TorchPredictor.overlap_host_work`);
* a ``predict_labels`` fast path that takes the argmax on the device, so only uint8
  class ids cross back;
* on the CPU, glibc's allocator is told to keep freed activation memory for the next
  pass (:func:`keep_freed_memory`) instead of page-faulting it in again every time.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import TilingError

if TYPE_CHECKING:
    from .openvino import Calibration, OpenVINOPredictor

__all__ = [
    "Backend",
    "CallablePredictor",
    "Precision",
    "Predictor",
    "TorchPredictor",
    "as_predictor",
    "build_predictor",
    "cpu_micro_batch",
    "cpu_supports_bf16",
    "first_width",
    "fold_batch_norm",
    "keep_freed_memory",
    "resolve_backend",
    "resolve_device",
    "resolve_precision",
    "usable_cores",
]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
Backend = Literal["auto", "torch", "openvino"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU micro-batch: tiles per forward pass such that the first level's activations stay
# within this many bytes. Measured on a 2-core AVX512/AMX Xeon (bench/, width-16 572x572
# tiles, ms per tile): fp32 batch 1/2/4 = 80/86/106, bf16 batch 1/2/4 = 31/30/40. Larger
# batches fall out of cache; this budget picks 1 tile for fp32 and 2 for bf16 there.
_CPU_ACTIVATION_BUDGET = 24 << 20
_CUDA_MAX_BATCH = 64
_CUDA_MEMORY_FRACTION = 0.6  # of the free device memory, for one batch's activations


@runtime_checkable
class Predictor(Protocol):
    """What the engine needs of a model: every hook is declared, none is looked up.

    ``depth``: the network depth (None: the caller passes it); ``overlap_host_work``: read
    the next batch on a worker thread while a pass runs; ``stage``: turn a normalized batch
    into what the passes take (pinned memory on CUDA), on that thread;
    ``preferred_batch_size``: tiles per batch for input windows of a shape.
    """

    @property
    def depth(self) -> int | None: ...

    @property
    def overlap_host_work(self) -> bool: ...

    def preferred_batch_size(self, tile_in: tuple[int, int]) -> int: ...

    def stage(self, x: npt.NDArray[np.float32]) -> Any: ...

    def __call__(self, x: Any) -> npt.NDArray[np.float32]:
        """(B, C, h, w) -> (B, K, h - 2m, w - 2m) scores or probabilities."""

    def predict_labels(self, x: Any) -> npt.NDArray[np.uint8]:
        """(B, C, h, w) -> (B, h - 2m, w - 2m) class ids."""


class CallablePredictor:
    """Any callable on numpy batches as a :class:`Predictor`: labels are the argmax of its
    scores, batches of ``batch_size``, staging is the identity.

    >>> crop = CallablePredictor(lambda x: x[:, :, 92:-92, 92:-92], depth=4)
    >>> crop.predict_labels(np.zeros((1, 2, 188, 188), np.float32)).shape
    (1, 4, 4)
    """

    def __init__(
        self,
        fn: Callable[[npt.NDArray[np.float32]], Any],
        *,
        depth: int | None = None,
        batch_size: int = 4,
        overlap_host_work: bool = True,
    ) -> None:
        self.fn, self._depth, self.batch_size, self._overlap = fn, depth, batch_size, overlap_host_work

    @property
    def depth(self) -> int | None:
        return self._depth

    @property
    def overlap_host_work(self) -> bool:
        return self._overlap

    def preferred_batch_size(self, tile_in: tuple[int, int]) -> int:
        return self.batch_size

    def stage(self, x: npt.NDArray[np.float32]) -> Any:
        return x

    def __call__(self, x: Any) -> npt.NDArray[np.float32]:
        return np.asarray(self.fn(x))

    def predict_labels(self, x: Any) -> npt.NDArray[np.uint8]:
        y = self(x)
        if y.ndim != 4:
            raise TilingError(f"model returned shape {tuple(y.shape)}; expected (B, K, h, w) scores")
        labels: npt.NDArray[np.uint8] = y.argmax(axis=1).astype(np.uint8)
        return labels

    def __repr__(self) -> str:
        return f"CallablePredictor({self.fn!r})"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu; refuse a device that is absent."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TilingError("device 'cuda' requested but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise TilingError(f"unsupported device {str(device)!r}; expected auto, cpu or cuda")
    return dev


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The runtime actually used: ``torch`` or ``openvino``.

    ``auto`` is OpenVINO on the CPU where the ``openvino`` extra is installed (it fuses what
    eager PyTorch runs op by op: 1.2x-2x faster per tile on the CPUs measured in
    docs/performance.md, at fp32 with the same labels), else torch; on CUDA always torch.
    """
    if backend not in ("auto", "torch", "openvino"):
        raise TilingError(f"unknown backend {backend!r}; expected auto, torch or openvino")
    from .openvino import openvino_available  # noqa: PLC0415  (the module imports openvino lazily)

    if backend == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if backend == "openvino":
        if device.type != "cpu":
            raise TilingError(f"the OpenVINO backend runs on the CPU, not {device.type}; use --device cpu")
        if not openvino_available():
            raise TilingError("the OpenVINO backend needs the 'openvino' package: pip install 'unet-tile[openvino]'")
    return backend


def resolve_precision(precision: str, device: torch.device, backend: str = "torch") -> str:
    """The precision actually used.

    ``auto`` is bf16 where the device computes it natively (CUDA GPUs with bf16, CPUs with
    AVX512-BF16/AMX) and fp32 elsewhere. bf16 was chosen for ``auto`` by measurement: on
    the demo checkpoint and demo image its labels agree with fp32 on >= 99.9 % of pixels
    (see docs/performance.md#precision); fp16 and int8 are never chosen automatically.
    int8 runs on the OpenVINO backend only.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
        raise TilingError(f"unknown precision {precision!r}; expected auto, fp32, bf16, fp16 or int8")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TilingError("fp16 needs a CUDA device; on the CPU use bf16 or fp32")
    if precision == "int8" and backend != "openvino":
        raise TilingError(
            "int8 runs on the OpenVINO backend: --backend openvino (pip install 'unet-tile[openvino,int8]')"
        )
    return precision


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``module`` with each ``Conv2d -> BatchNorm2d`` pair (adjacent
    in an ``nn.Sequential``) folded into one convolution. Same function, fewer passes over
    the activations.

    >>> seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    >>> [type(m).__name__ for m in fold_batch_norm(seq)]
    ['Conv2d', 'Identity', 'ReLU']
    """
    folded = copy.deepcopy(module).eval()
    for parent in folded.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for conv_name, bn_name in itertools.pairwise(names):
            conv, bn = parent._modules[conv_name], parent._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                parent._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                parent._modules[bn_name] = nn.Identity()
    return folded


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 128 << 20  # blocks below this come from the heap, so freed ones are reused
_TRIM_THRESHOLD = 512 << 20  # free heap kept at the top before it goes back to the OS


@functools.cache  # once per process (a second call would only repeat the same settings)
def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed activation memory across forward passes (once per process).

    A CPU forward pass allocates and frees tens of MiB per layer. By default glibc hands
    blocks above its (dynamic, at most 32 MiB) mmap threshold out as fresh mappings and
    trims freed heap, so when other allocations interleave with the passes, as in the
    engine, every pass page-faults its activations in again. Measured on a 4096x4096
    image at bf16 (``bench/``): ~0.9 million minor faults and ~25 % of the engine's time;
    with fixed thresholds (heap below 128 MiB, trim above 512 MiB free): no faults.
    Threads started afterwards share the main heap (one arena): a thread's own arena
    is made of 64 MiB heaps that are unmapped as soon as they empty, so inference on a
    worker thread (the server's) faulted ~0.35 million times per image even with the
    thresholds fixed, and not at all with one arena. The cost: up to 512 MiB of freed
    memory stays with the process, and threads that allocate at once take turns.
    Process-wide, like any allocator setting; returns whether it applied (not on a libc
    without ``mallopt``).
    """
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_ARENA_MAX, 1))
    applied = all([mallopt(param, value) == 1 for param, value in settings])  # every one applied
    log.debug("malloc thresholds fixed for tensor reuse: %s", applied)
    return applied


def cpu_micro_batch(width: int, tile_in: tuple[int, int], element_bytes: int) -> int:
    """Tiles per CPU forward pass whose first-level activations (``width`` channels of
    ``element_bytes`` each) fit :data:`_CPU_ACTIVATION_BUDGET`.

    >>> cpu_micro_batch(16, (572, 572), 4), cpu_micro_batch(16, (572, 572), 2)
    (1, 2)
    """
    return max(1, _CPU_ACTIVATION_BUDGET // (width * tile_in[0] * tile_in[1] * element_bytes))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def first_width(module: nn.Module) -> int:
    """The first convolution's output channels (64 for a network without one)."""
    return next((m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)), 64)


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(error)


class TorchPredictor:
    """Run a valid-padding ``nn.Module`` on numpy tile batches."""

    backend = "torch"

    def __init__(
        self,
        module: nn.Module,
        *,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        channels_last: bool = True,
        fold_bn: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = channels_last
        prepared = fold_batch_norm(module) if fold_bn else module.eval()
        self.module = prepared.to(self.device)
        if self.device.type == "cuda":
            # tiles share one shape: let cuDNN pick the fastest convolution once (process-wide)
            torch.backends.cudnn.benchmark = True
        else:
            keep_freed_memory()
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        config = getattr(module, "config", None)
        self.depth: int | None = getattr(config, "depth", None)
        self._width = first_width(module)
        self._oom_limit: int | None = None  # tiles per pass after an out-of-memory back-off

    @property
    def overlap_host_work(self) -> bool:
        """Whether the engine should read the next batch on a worker thread during a pass.

        On CUDA the host idles while the GPU computes, so yes. On the CPU only when torch's
        threads leave a core free: otherwise the reader takes a core from one of them and
        the others wait for it at every operator (measured in ``bench/``).
        """
        if self.device.type == "cuda":
            return True
        return torch.get_num_threads() < usable_cores()

    # -- batch sizes -------------------------------------------------------------------

    def preferred_batch_size(self, tile_in: tuple[int, int]) -> int:
        """Tiles per batch for input windows of ``tile_in``: on the CPU a cache-sized batch
        (measured fastest), on CUDA what fits in a share of the free device memory."""
        if self.device.type == "cuda":
            return self._cuda_batch_size(tile_in)
        return self._cpu_micro_batch(tile_in)

    def _cpu_micro_batch(self, tile_in: tuple[int, int]) -> int:
        return cpu_micro_batch(self._width, tile_in, 2 if self.precision in _DTYPES else 4)

    def _cuda_batch_size(self, tile_in: tuple[int, int]) -> int:
        """Probe one tile's peak activation memory, then fill a share of what is free."""
        in_channels = next((m.in_channels for m in self.module.modules() if isinstance(m, nn.Conv2d)), 1)
        probe = np.zeros((1, in_channels, *tile_in), np.float32)
        self.predict_labels(probe)  # first: cuDNN's algorithm search, whose scratch space can be most of the card
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.predict_labels(probe)
        per_tile = max(1, torch.cuda.max_memory_allocated(self.device) - before)
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # cached blocks
        return int(min(_CUDA_MAX_BATCH, max(1, _CUDA_MEMORY_FRACTION * free // per_tile)))

    # -- running ----------------------------------------------------------------------

    def stage(self, x: npt.NDArray[np.float32]) -> torch.Tensor:
        """Batch -> tensor ready to send (pinned on CUDA); run on the engine's reader thread."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return t.pin_memory() if self.device.type == "cuda" else t

    def _to_device(self, x: npt.NDArray[np.float32] | torch.Tensor) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else self.stage(x)
        if self.device.type == "cuda":
            t = t.to(self.device, non_blocking=t.is_pinned())
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _run(self, t: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``head(logits)`` for the batch, in micro-batches; halves them on CUDA out-of-memory."""
        while True:
            step = t.shape[0]
            if self.device.type == "cpu":
                step = min(step, self._cpu_micro_batch((t.shape[-2], t.shape[-1])))
            if self._oom_limit is not None:
                step = min(step, self._oom_limit)
            try:
                return self._passes(t, step, head)
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not _is_out_of_memory(e) or step == 1:
                    raise
            # outside the except block, so the failed pass's tensors are already released
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._oom_limit = step // 2
            log.warning("out of memory with %d tiles per pass; retrying with %d", step, self._oom_limit)

    def _passes(self, t: torch.Tensor, step: int, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        dtype = _DTYPES.get(self.precision)
        parts = []
        for i in range(0, t.shape[0], step):
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                parts.append(head(self.module(t[i : i + step])))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.inference_mode()
    def __call__(self, x: npt.NDArray[np.float32] | torch.Tensor) -> npt.NDArray[np.float32]:
        """Per-class probabilities (softmax over the class axis)."""
        out = self._run(self._to_device(x), lambda logits: torch.softmax(logits.float(), dim=1))
        return out.cpu().numpy()

    @torch.inference_mode()
    def predict_labels(self, x: npt.NDArray[np.float32] | torch.Tensor) -> npt.NDArray[np.uint8]:
        """Class ids (argmax), computed on the device; only uint8 crosses back."""
        out = self._run(self._to_device(x), lambda logits: logits.argmax(dim=1).to(torch.uint8))
        return out.cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchPredictor(device={self.device}, precision={self.precision})"


def build_predictor(
    module: nn.Module,
    *,
    backend: str = "auto",
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cache_dir: Path | None = None,
    calibration: Calibration | None = None,
) -> TorchPredictor | OpenVINOPredictor:
    """The predictor for ``module`` on the backend, device and precision asked for.

    ``cache_dir`` and ``calibration`` (int8) are the OpenVINO backend's; see :class:`tiling.openvino.OpenVINOPredictor`.
    """
    dev = resolve_device(device)
    chosen = resolve_backend(backend, dev)
    resolved = resolve_precision(precision, dev, chosen)
    if chosen == "torch":
        return TorchPredictor(module, device=dev, precision=resolved)
    from .openvino import OpenVINOPredictor  # noqa: PLC0415

    config = getattr(module, "config", None)
    return OpenVINOPredictor(
        fold_batch_norm(module),
        precision=resolved,
        depth=getattr(config, "depth", None),
        cache_dir=cache_dir,
        calibration=calibration,
    )


def as_predictor(model: Any, *, depth: int | None = None, **kwargs: Any) -> Predictor:
    """A module becomes a :class:`TorchPredictor` (``kwargs``: device, precision), a
    :class:`Predictor` stays as it is, any other callable becomes a :class:`CallablePredictor`."""
    if isinstance(model, nn.Module):
        return TorchPredictor(model, **kwargs)
    if isinstance(model, Predictor):
        return model
    if not callable(model):
        raise TilingError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    return CallablePredictor(model, depth=depth)
