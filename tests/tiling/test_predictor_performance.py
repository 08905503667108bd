"""The predictor's speed paths keep results exact: folded batch norm, micro-batches,
out-of-memory back-off, staged inputs, and batch sizes chosen by the predictor."""

from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tiling
from tests.conftest import make_model
from tiling.predictor import fold_batch_norm


def _batch(n: int, size: int = 572, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, size, size)).astype(np.float32)


def test_folded_batch_norm_computes_the_same_function_and_leaves_the_model_alone() -> None:
    model = make_model(base_width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18  # 9 double convs, untouched
    x = torch.from_numpy(_batch(1, 188))
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_predictor_does_not_change_the_callers_module() -> None:
    model = make_model(base_width=2)
    tiling.TorchPredictor(model, precision="fp32")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.is_contiguous() for p in model.parameters())  # not switched to channels-last in place


class _RefusesLargeBatches(nn.Module):
    """A real network that raises CUDA's out-of-memory error above ``limit`` tiles per pass."""

    def __init__(self, net: nn.Module, limit: int, error: type[RuntimeError] = torch.cuda.OutOfMemoryError) -> None:
        super().__init__()
        self.net, self.limit, self.error = net, limit, error
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        out: torch.Tensor = self.net(x)
        return out


def test_out_of_memory_halves_the_batch_and_gives_the_same_labels(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model(base_width=2)
    x = _batch(5, 188)
    expected = tiling.TorchPredictor(model, precision="fp32").predict_labels(x)
    predictor = tiling.TorchPredictor(_RefusesLargeBatches(model, limit=2), precision="fp32")
    with caplog.at_level(logging.WARNING, logger="tiling.predictor"):
        np.testing.assert_array_equal(predictor.predict_labels(x), expected)
    assert "out of memory with 5 tiles per pass; retrying with 2" in caplog.text
    np.testing.assert_array_equal(predictor.predict_labels(x), expected)  # remembers the smaller size
    assert predictor.module.calls == [5, 2, 2, 1, 2, 2, 1]


def test_out_of_memory_at_one_tile_and_other_errors_propagate() -> None:
    model = make_model(base_width=2)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tiling.TorchPredictor(_RefusesLargeBatches(model, limit=0), precision="fp32").predict_labels(_batch(2, 188))
    other = tiling.TorchPredictor(_RefusesLargeBatches(model, limit=1, error=ValueError), precision="fp32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CUDA out of memory"):
        other.predict_labels(_batch(2, 188))


def test_cpu_micro_batches_and_staged_inputs_give_identical_results() -> None:
    model = make_model(base_width=8)
    predictor = tiling.TorchPredictor(model, precision="fp32")
    size = 572
    assert predictor.preferred_batch_size((size, size)) == max(1, (24 << 20) // (8 * size * size * 4))
    bf16 = tiling.TorchPredictor(model, precision="bf16")  # half the bytes per activation: twice the tiles
    assert bf16.preferred_batch_size((size, size)) == max(1, (24 << 20) // (8 * size * size * 2))
    x = _batch(3, 188)
    whole = predictor(x)
    staged = predictor(predictor.stage(x))
    one_by_one = np.concatenate([predictor(x[i : i + 1]) for i in range(3)])
    np.testing.assert_array_equal(staged, whole)
    np.testing.assert_allclose(one_by_one, whole, atol=1e-6)


def test_segment_lets_the_predictor_choose_the_batch_size() -> None:
    model = make_model(base_width=2)
    img = np.random.default_rng(5).normal(size=(700, 90)).astype(np.float32)
    counting = tiling.TorchPredictor(_RefusesLargeBatches(model, limit=100), precision="fp32")
    chosen = tiling.segment(img, counting, depth=4, normalize=None)
    np.testing.assert_array_equal(chosen, tiling.segment(img, model, batch_size=1, normalize=None))
    assert counting.module.calls == [2]  # 2 tiles in one pass: width-2 tiles fit the CPU's micro-batch


def test_auto_precision_follows_the_hardware() -> None:
    cpu = torch.device("cpu")
    expected = "bf16" if tiling.predictor.cpu_supports_bf16() else "fp32"
    assert tiling.resolve_precision("auto", cpu) == expected
    assert tiling.resolve_precision("fp32", cpu) == "fp32"


_FAULTS_SCRIPT = """
import json, resource, sys
import numpy as np
import tiling
from tests.conftest import make_model
from concurrent.futures import ThreadPoolExecutor

applied = tiling.keep_freed_memory() if sys.argv[1] == "tuned" else False  # as unet-tile does, before any thread
if sys.argv[1] != "tuned":
    tiling.predictor.keep_freed_memory = lambda: False  # glibc's defaults, for contrast
predictor = tiling.TorchPredictor(make_model(base_width=8), device="cpu", precision="fp32")
x = np.random.default_rng(0).normal(size=(2, 1, 572, 572)).astype(np.float32)

def faults_per_pass():
    predictor.predict_labels(x)  # warm
    predictor.predict_labels(x)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(3):
        predictor.predict_labels(x)
    return (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 3

with ThreadPoolExecutor(1) as pool:  # inference on a worker thread, as in the server
    print(json.dumps({"applied": applied, "faults": pool.submit(faults_per_pass).result()}))
"""


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="per-thread page-fault counts are Linux-only")
def test_repeated_passes_on_a_worker_thread_reuse_their_memory() -> None:
    """With keep_freed_memory() called first (as ``unet-tile`` does), warm forward passes on
    a worker thread page-fault (almost) nothing: activation memory is reused, not mapped
    afresh. Fresh processes, so the allocator state is that of a real start.

    What glibc's defaults do is a fact of the machine (they faulted thousands of pages per
    pass on a Xeon with glibc 2.36 and none on a Zen 5 with the same glibc), so the default
    is only compared with where it is seen to fault."""
    root = Path(__file__).resolve().parents[2]

    def run(mode: str) -> dict[str, float]:
        proc = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, cwd=root, check=True
        )
        result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    tuned = run("tuned")
    if not tuned["applied"]:
        pytest.skip("this libc has no mallopt")
    # one pass touches ~80 MiB of activations (~20,000 pages); the tuned allocator reuses them
    assert tuned["faults"] < 500
    default = run("default")
    print(f"page faults per warm pass: tuned {tuned['faults']:.0f}, glibc defaults {default['faults']:.0f}")
    if default["faults"] >= 2500:  # where the defaults are seen to fault, the tuning is what stops it
        assert default["faults"] > 5 * max(tuned["faults"], 100)
