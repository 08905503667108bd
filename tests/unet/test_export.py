"""TorchScript and ONNX files of the network compute what it computes, at every valid size and
batch; their tensors read back without running anything from the file."""

from __future__ import annotations

import errno
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import unet
from tests.conftest import make_model
from unet.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    config_from_state_dict,
    export_onnx,
    export_torchscript,
    onnx_state_dict,
    torchscript_state_dict,
)

SHAPES = [(1, 188, 188), (2, 204, 236), (1, 380, 572)]  # (batch, H, W): the smallest, a batch of 2, non-square


def _inputs(in_channels: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, in_channels, h, w, generator=g) for b, h, w in SHAPES]


def _jit_load(path: Path) -> Any:
    # torch 2.13 deprecates torch.jit.load; it is what TorchScript's consumers (deepImageJ's engine, QuPath) call
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning)
        return torch.jit.load(str(path))


def test_torchscript_computes_the_model_at_every_valid_size_and_batch(tmp_path: Path) -> None:
    model = make_model(num_classes=3)
    traced = _jit_load(export_torchscript(model, tmp_path / "m.pt"))
    with torch.no_grad():
        for x in _inputs(1):
            got, want = traced(x), model(x)
            assert got.shape == (x.shape[0], 3, x.shape[2] - 184, x.shape[3] - 184)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize(
    "config",
    [
        unet.UNetConfig(num_classes=3, base_width=4),
        unet.UNetConfig(in_channels=3, num_classes=4, depth=2, base_width=2, batch_norm=False),
    ],
    ids=["depth4-bn", "rgb-depth2-no-bn"],
)
def test_torchscript_tensors_read_back_are_the_state_dict_without_running_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: unet.UNetConfig
) -> None:
    torch.manual_seed(0)
    model = unet.UNet(config).eval()
    path = export_torchscript(model, tmp_path / "m.pt")

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    state = torchscript_state_dict(path)
    want = model.state_dict()
    assert sorted(state) == sorted(want)
    assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    assert config_from_state_dict(state) == config
    assert torchscript_state_dict(path.read_bytes()).keys() == state.keys()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_an_archive_whose_pickle_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(unet.CheckpointError, match=r"refusing to load (posix|os|nt)\.system"):
        torchscript_state_dict(path)
    assert not marker.exists()
    (tmp_path / "plain.pt").write_bytes(b"not a zip at all")
    with pytest.raises(unet.CheckpointError, match="unreadable TorchScript archive"):
        torchscript_state_dict(tmp_path / "plain.pt")
    with pytest.raises(unet.CheckpointError, match="not found"):
        torchscript_state_dict(tmp_path / "missing.pt")


def test_weights_of_another_architecture_are_refused() -> None:
    with pytest.raises(unet.CheckpointError, match=r"not the unet-tile U-Net's weights: no inc\.0\.weight"):
        config_from_state_dict({"conv1.weight": torch.zeros(8, 1, 3, 3), "head.weight": torch.zeros(2, 8, 1, 1)})
    state = make_model().state_dict()
    del state["downs.1.conv.0.weight"], state["downs.1.conv.3.weight"]
    state = {k: v for k, v in state.items() if not k.startswith("downs.1.")}
    with pytest.raises(unet.CheckpointError, match=r"encoder levels \[0, 2, 3\]"):
        config_from_state_dict(state)


def test_a_write_that_fails_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_full(_: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.jit, "save", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        export_torchscript(make_model(), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # torch.export traces the network: ~10 s
def test_onnx_computes_the_model_in_onnx_runtime_and_keeps_the_state_dict_names(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = make_model(num_classes=3)
    path = export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [20]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
    assert dims == {INPUT_NAME: ["batch", 1, "16*ny + 188", "16*nx + 188"]}
    assert [v.name for v in proto.graph.output] == [OUTPUT_NAME]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in _inputs(1):
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            want = model(x).numpy()
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    state, want_state = onnx_state_dict(path), model.state_dict()
    params = {
        k for k in want_state if not k.endswith("num_batches_tracked")
    }  # batch norm's counters are not in a graph
    assert params <= state.keys()
    assert all(torch.equal(state[k], want_state[k]) for k in params)
    assert config_from_state_dict(state) == model.config
