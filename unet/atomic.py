"""Atomic writes: a file or directory appears complete under its name, or not at all.

:func:`atomic_path` hands out a temporary path beside the target and renames it onto the
target only when the writer finishes without an error (:class:`AtomicTarget`, the same for
a writer that lives across several calls); a writer that fails (or is
interrupted) leaves the target as it was and no temporary file behind. A process killed
mid-write cannot clean up: its leftovers are named ``.{name}.<random>.part``, so whoever
owns the directory can delete them at its next start.

It lives in :mod:`unet`, the lowest of the three packages, because all of them write
atomically: checkpoints and training state here, and above, the service's results, job
records and the training command's data sets (imports point one way, service -> tiling
-> unet).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["AtomicTarget", "atomic_path"]

_ATTEMPTS = 100  # fresh names tried before giving up (a clash needs the same 48 random bits)


@contextmanager
def atomic_path(target: str | os.PathLike[str], *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on a clean exit, ``fsync`` it and rename it onto
    ``target`` (then ``fsync`` the directory, so the new name survives a power cut too).

    The path is ``.{name}.<random>.part`` in the target's directory: a file created empty
    (or, with ``directory=True``, an empty directory). The target gets the permissions
    ``open()`` (or ``mkdir``) would give it under the process's umask, whatever mode the
    writer's library used (safetensors, ``mkstemp``: 0600). On a clean exit a file replaces
    the target with :func:`os.replace`; a directory takes the place of an existing target
    by renaming the old one aside, the new one in, then deleting the old one (a target
    that never existed is not created half-way). On any exception, ``KeyboardInterrupt``
    included, the temporary file or tree is deleted and the exception re-raised.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> out = Path(tmp.name) / "mask.txt"
    >>> with atomic_path(out) as part:
    ...     _ = part.write_text("done")
    ...     part.name.startswith(".mask.txt.") and part.name.endswith(".part"), out.exists()
    (True, False)
    >>> out.read_text()
    'done'
    >>> with atomic_path(out) as part:
    ...     _ = part.write_text("half")
    ...     raise OSError("disk full")
    Traceback (most recent call last):
    ...
    OSError: disk full
    >>> out.read_text(), sorted(p.name for p in Path(tmp.name).iterdir())
    ('done', ['mask.txt'])
    >>> with atomic_path(Path(tmp.name) / "store.zarr", directory=True) as part:
    ...     _ = (part / "zarr.json").write_text("{}")
    >>> sorted(p.name for p in (Path(tmp.name) / "store.zarr").iterdir())
    ['zarr.json']
    >>> tmp.cleanup()
    """
    atomic = AtomicTarget(target, directory=directory)
    try:
        yield atomic.path
    except BaseException:
        atomic.discard()
        raise
    atomic.commit()


class AtomicTarget:
    """:func:`atomic_path` for a writer whose life spans several calls (a sink, a table, a
    GeoJSON file): :attr:`path` is the temporary path, :meth:`commit` puts it in the target's
    place (mode, fsync, rename, fsync of the directory, as :func:`atomic_path` does) and
    :meth:`discard` deletes it. Once either has run, :meth:`discard` does nothing.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> out = AtomicTarget(Path(tmp.name) / "table.csv")
    >>> _ = out.path.write_text("id\\n")
    >>> out.commit(); out.discard()
    >>> sorted(p.name for p in Path(tmp.name).iterdir())
    ['table.csv']
    >>> tmp.cleanup()
    """

    def __init__(self, target: str | os.PathLike[str], *, directory: bool = False) -> None:
        self.target, self.directory = Path(target), directory
        self.path = _create(self.target, directory)
        self._done = False

    def commit(self) -> None:
        """Rename the temporary path onto the target; on any error delete it and re-raise."""
        if self._done:
            raise RuntimeError(f"{self.target.name}: already committed or discarded")
        self._done = True
        part, target = self.path, self.target
        try:
            os.chmod(part, (0o777 if self.directory else 0o666) & ~_umask())  # a writer may have made its own (0600)
            _sync_tree(part) if self.directory else _sync(part)  # the data on disk before the name points at it
            if self.directory:
                _rename_directory(part, target)
            else:
                os.replace(part, target)
            _sync(target.parent)  # and the rename itself
        except BaseException:
            _remove(part)
            raise

    def discard(self) -> None:
        """Delete the temporary file or tree; the target stays as it was."""
        if self._done:
            return
        self._done = True
        _remove(self.path)


def _umask() -> int:
    """The process's umask, read without changing it (Linux's /proc; else set and put back)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sync(path: Path) -> None:
    """``fsync`` a file's data, or a directory's entries (read-only descriptors do on Linux)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for parent, _, files in os.walk(root):
        for name in files:
            _sync(Path(parent) / name)
        _sync(Path(parent))


def _fresh_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")


def _create(target: Path, directory: bool) -> Path:
    """A new empty file or directory beside ``target``, made exclusively (never an existing one)."""
    for _ in range(_ATTEMPTS):
        part = _fresh_name(target)
        try:
            if directory:
                part.mkdir(0o777)
            else:
                os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return part
    raise FileExistsError(f"no free temporary name beside {target} after {_ATTEMPTS} tries")


def _rename_directory(part: Path, target: Path) -> None:
    """Put directory ``part`` in ``target``'s place; an existing target goes aside first, then is deleted."""
    if not os.path.lexists(target):
        os.rename(part, target)
        return
    aside = _fresh_name(target)  # a .part name too: if the process dies here, it is a leftover like any other
    os.rename(target, aside)
    try:
        os.rename(part, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    """Delete a file or a tree; what is already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
