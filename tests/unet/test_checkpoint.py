from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import unet
from tests.conftest import make_model
from unet import CheckpointError, Normalization, UNetConfig


def _tensors_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_carries_everything(tmp_path: Path) -> None:
    model = make_model(in_channels=2, num_classes=3)
    norm = Normalization("fixed", mean=(10.0, 20.0), std=(2.0, 4.0))
    path = tmp_path / "m.safetensors"
    digest = unet.save_checkpoint(
        path, model, normalization=norm, class_names=["bg", "nucleus", "edge"], foreground=[1], info={"seed": 3}
    )
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    ck = unet.load_checkpoint(path)
    assert ck.config == model.config
    assert ck.normalization == norm
    assert ck.class_names == ("bg", "nucleus", "edge")
    assert ck.foreground == (1,)
    assert ck.info == {"seed": 3}
    assert ck.sha256 == digest
    assert ck.format_version == unet.checkpoint.FORMAT_VERSION
    assert not ck.model.training
    assert _tensors_equal(ck.model, model)
    x = torch.randn(1, 2, 188, 188)
    with torch.no_grad():
        assert torch.equal(ck.model(x), model(x))


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path: Path) -> None:
    model = make_model(base_width=8)
    full, half = tmp_path / "f32.safetensors", tmp_path / "f16.safetensors"
    unet.save_checkpoint(full, model)
    unet.save_checkpoint(half, model, weights_dtype="float16")
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded = unet.load_checkpoint(half).model
    for k, v in loaded.state_dict().items():
        ref = model.state_dict()[k]
        assert v.dtype == ref.dtype
        if v.is_floating_point():
            torch.testing.assert_close(v, ref, atol=2e-3, rtol=1e-3)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    unet.save_checkpoint(tmp_path / "m.safetensors", make_model())
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        unet.load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [0, 7, 100, -1000])
def test_truncated_file_refused(tiny_checkpoint: Path, tmp_path: Path, cut: int) -> None:
    data = tiny_checkpoint.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors checkpoint"):
        unet.load_checkpoint(bad)


def test_random_bytes_refused(tmp_path: Path) -> None:
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        unet.load_checkpoint(bad)


def test_foreign_safetensors_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a unet-tile checkpoint"):
        unet.load_checkpoint(path)


def _rewrite(
    src: Path, dst: Path, *, drop: str | None = None, reshape: str | None = None, meta: dict[str, str] | None = None
) -> None:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = torch.zeros(tensors[reshape].numel() + 1)
    metadata.update(meta or {})
    save_file(tensors, dst, metadata=metadata)


def test_missing_key_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    _rewrite(tiny_checkpoint, bad, drop="head.weight")
    with pytest.raises(CheckpointError, match=r"missing keys: head\.weight"):
        unet.load_checkpoint(bad)


def test_wrong_shape_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    _rewrite(tiny_checkpoint, bad, reshape="head.bias")
    with pytest.raises(CheckpointError, match=r"shape mismatches: head\.bias: expected \(2,\), got \(3,\)"):
        unet.load_checkpoint(bad)


def test_config_that_does_not_match_weights_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    cfg = UNetConfig(base_width=8)
    _rewrite(tiny_checkpoint, bad, meta={"config": json.dumps(cfg.to_dict())})
    with pytest.raises(CheckpointError, match="weights do not match"):
        unet.load_checkpoint(bad)


def test_expected_config_mismatch_names_the_difference(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="in_channels: expected 3, got 1"):
        unet.load_checkpoint(tiny_checkpoint, expect=UNetConfig(in_channels=3, base_width=4))
    assert unet.load_checkpoint(tiny_checkpoint, expect=UNetConfig(base_width=4)).config.base_width == 4


def test_newer_format_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "future.safetensors"
    _rewrite(tiny_checkpoint, bad, meta={"format_version": "99"})
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        unet.load_checkpoint(bad)


def test_bad_metadata_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    _rewrite(tiny_checkpoint, bad, meta={"class_names": "[not json"})
    with pytest.raises(CheckpointError, match="'class_names' is not valid JSON"):
        unet.load_checkpoint(bad)
    _rewrite(tiny_checkpoint, bad, meta={"class_names": json.dumps(["only-one"])})
    with pytest.raises(CheckpointError, match="expected 2 class names"):
        unet.load_checkpoint(bad)


def test_import_plain_state_dict(tmp_path: Path) -> None:
    model = make_model()
    pt = tmp_path / "plain.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, pt)
    imported = unet.import_state_dict(pt, model.config)
    assert _tensors_equal(imported, model)
    assert not imported.training
    out = tmp_path / "imported.safetensors"
    unet.save_checkpoint(out, imported)
    assert _tensors_equal(unet.load_checkpoint(out).model, model)


def test_import_refuses_wrong_architecture(tmp_path: Path) -> None:
    pt = tmp_path / "plain.pt"
    torch.save(make_model().state_dict(), pt)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        unet.import_state_dict(pt, UNetConfig(base_width=8))


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickle payload executed",))


def test_import_never_unpickles_arbitrary_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pt = tmp_path / "evil.pt"
    with open(pt, "wb") as f:
        pickle.dump({"head.weight": _Payload()}, f)
    with pytest.raises(CheckpointError, match="not a loadable weights-only PyTorch file"):
        unet.import_state_dict(pt, UNetConfig(base_width=4))
    assert "pickle payload executed" not in capsys.readouterr().out
