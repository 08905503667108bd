"""unet.atomic: a target is replaced whole or left alone, and no temporary file outlives its writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unet.atomic import atomic_path


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_a_clean_write_replaces_the_target_and_leaves_only_it(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as part:
        assert part.parent == tmp_path and part.name.startswith(".out.bin.") and part.name.endswith(".part")
        assert part.read_bytes() == b""  # created empty, beside the target
        part.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing changes before the writer is done
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == ["out.bin"]


def test_a_failing_write_leaves_neither_a_changed_target_nor_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="no space"), atomic_path(target) as part:
        part.write_bytes(b"half")
        raise OSError("no space left on device")
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["out.bin"]


def test_a_failing_first_write_creates_no_target(tmp_path: Path) -> None:
    with pytest.raises(ValueError), atomic_path(tmp_path / "new.bin") as part:
        part.write_bytes(b"half")
        raise ValueError("encoder failed")
    assert names(tmp_path) == []


def test_keyboard_interrupt_cleans_up_too(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "out.bin") as part:
        part.write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "tree", directory=True) as part:
        (part / "sub").mkdir()
        (part / "sub" / "chunk").write_bytes(b"x")
        raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_directory_mode_replaces_an_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "store.zarr"
    (target / "old").mkdir(parents=True)
    (target / "old" / "chunk").write_bytes(b"old")
    with atomic_path(target, directory=True) as part:
        assert part.is_dir() and names(part) == []
        (part / "zarr.json").write_text("{}")
        assert names(target) == ["old"]
    assert names(target) == ["zarr.json"]
    assert names(tmp_path) == ["store.zarr"]  # the old tree went, not aside


def test_directory_mode_that_fails_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "zarr.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, directory=True) as part:
        (part / "zarr.json").write_text("new")
        raise RuntimeError("worker died")
    assert (target / "zarr.json").read_text() == "old"
    assert names(tmp_path) == ["store.zarr"]


def test_a_file_cannot_replace_a_directory_and_its_temp_file_goes(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError), atomic_path(tmp_path / "taken") as part:
        part.write_bytes(b"data")
    assert names(tmp_path) == ["taken"] and names(tmp_path / "taken") == []


def test_a_missing_parent_directory_is_an_error_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "nope" / "out.bin"):
        pytest.fail("the body must not run")


def test_the_data_and_the_rename_are_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_path(tmp_path / "out.bin") as part:
        part.write_bytes(b"data")
        name = str(part)
    assert synced == [name, str(tmp_path)]  # the file before the rename, its directory after
    synced.clear()
    with atomic_path(tmp_path / "store", directory=True) as part:
        (part / "a").write_bytes(b"1")
        store = str(part)
    assert synced == [f"{store}/a", store, str(tmp_path)]
