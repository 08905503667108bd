"""What the cluster tests share: inputs, single-machine references, whole-store comparisons and
``dask scheduler`` / ``dask worker`` processes on 127.0.0.1.

Nothing here runs at import: Dask workers are spawned processes that may import it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tifffile
import zarr
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Node, Reader

import unet
from service.pipeline import Options, Report, segment_file
from service.segmenter import Segmenter
from tests.service.conftest import free_port

with warnings.catch_warnings():  # ome_zarr.writer makes a deprecated Scaler() default argument at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.writer import write_image

__all__ = [
    "BIN",
    "REPO",
    "DaskProcesses",
    "assert_same_store",
    "chunk_files",
    "make_image",
    "ome_nodes",
    "read_back",
    "reference",
    "store_tree",
    "write_input",
]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # .venv/bin: unet-tile, dask
_META = {".zarray", ".zattrs", ".zgroup", "zarr.json"}


def make_image(shape: tuple[int, ...], kind: str, seed: int = 0) -> npt.NDArray[Any]:
    """Noise of ``kind`` (``uint8``, ``uint16`` or ``float32-nan``: float32 with NaN pixels,
    a rectangle and scattered ones)."""
    rng = np.random.default_rng(seed)
    if kind == "uint8":
        return rng.integers(0, 256, shape).astype(np.uint8)
    if kind == "uint16":
        return rng.integers(0, 4000, shape).astype(np.uint16)
    assert kind == "float32-nan", kind
    image = (rng.random(shape) * 100).astype(np.float32)
    image[..., 100:180, 200:330] = np.nan
    image[rng.random(shape) < 0.01] = np.nan
    return image


def write_input(path: Path, data: npt.NDArray[Any], kind: str, *, factors: Sequence[int] = (2, 4)) -> Path:
    """``data`` (YX or ZYX) as a TIFF (``kind`` ``tif``) or an OME-Zarr image written by
    ome-zarr-py (``zarr0.4`` / ``zarr0.5``, with pyramid levels ``factors`` past 0)."""
    axes = "zyx" if data.ndim == 3 else "yx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "tif":
        path = path.with_suffix(".tif")
        tifffile.imwrite(path, data, **({"imagej": True, "metadata": {"axes": "ZYX"}} if data.ndim == 3 else {}))
        return path
    path = path.with_suffix(".ome.zarr")
    fmt = FormatV04() if kind == "zarr0.4" else FormatV05()
    chunks = tuple(min(128, n) if a in "yx" else 1 for a, n in zip(axes, data.shape, strict=True))
    write_image(
        data,
        str(path),
        fmt=fmt,
        axes=list(axes),
        scale={a: 0.5 if a in "yx" else 2.0 for a in axes},
        axes_units={a: "micrometer" for a in axes},
        scale_factors=list(factors),
        storage_options={"chunks": chunks},
    )
    return path


def reference(
    checkpoint: Path, src: Path, dst: Path | None, options: Options | None = None, *, into_input: bool = False
) -> Report:
    """The single-machine run the cluster must equal: fp32 on the CPU."""
    segmenter = Segmenter(unet.load_checkpoint(checkpoint), device="cpu", precision="fp32")
    return segment_file(segmenter, src, dst, options or Options(), into_input=into_input)


def store_tree(path: Path) -> dict[str, Any]:
    """Every group (its attributes) and array (dtype, shape, chunks, attributes, values) of a
    Zarr store, by path inside it."""
    root = zarr.open_group(str(path), mode="r")
    tree: dict[str, Any] = {"": ("group", root.attrs.asdict())}
    for name, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            tree[name] = (str(node.dtype), node.shape, node.chunks, node.attrs.asdict(), np.asarray(node[...]))
        else:
            tree[name] = ("group", node.attrs.asdict())
    return tree


def assert_same_store(got: Path, want: Path) -> dict[str, Any]:
    """``got`` has ``want``'s groups, arrays, metadata and values (NaN where it has NaN), and
    its chunk files; returns ``got``'s tree."""
    a, b = store_tree(got), store_tree(want)
    assert sorted(a) == sorted(b)
    for name in a:
        if a[name][0] == "group":
            assert a[name] == b[name], name
            continue
        assert a[name][:4] == b[name][:4], name
        np.testing.assert_array_equal(a[name][4], b[name][4], err_msg=name)
    assert chunk_files(got) == chunk_files(want)  # written whole, the same chunks (none missing, none stray)
    return a


def chunk_files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name not in _META}


def ome_nodes(path: Path) -> list[Node]:
    """What ome-zarr-py's reader finds in the store at ``path``."""
    location = parse_url(path)
    assert location is not None, path
    return list(Reader(location)())


def read_back(path: Path, label_name: str = "unet") -> tuple[Node, Node]:
    """The image and label nodes ome-zarr-py reads from ``path``, checked to be a multiscales
    image with one multiscales label image of as many levels."""
    found = ome_nodes(path)
    images = [n for n in found if n.first(Multiscales) is not None and n.first(Label) is None]
    labels = [n for n in found if n.first(Label) is not None and n.zarr.basename() == label_name]
    assert len(images) == 1 and len(labels) == 1, found
    assert len(labels[0].data) == len(images[0].data) >= 1
    assert [d.shape[-2:] for d in labels[0].data] == [d.shape[-2:] for d in images[0].data]
    return images[0], labels[0]


class DaskProcesses:
    """``dask scheduler`` and ``workers`` x ``dask worker --nthreads 1`` on 127.0.0.1, as
    separate processes (their logs under ``logs``)."""

    def __init__(self, logs: Path, workers: int = 2) -> None:
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.logs, self.workers = logs, workers
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "UNET_"))}
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs.append(
                subprocess.Popen([str(BIN / "dask"), *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            )

    def start(self) -> None:
        self._spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard")
        for i in range(self.workers):
            local = self.logs / f"worker-{i}"
            local.mkdir()
            self._spawn(
                f"worker-{i}",
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--local-directory",
                str(local),
            )

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM the workers, then (once they left it) the scheduler; SIGKILL what hangs."""
        workers, scheduler = self.procs[1:], self.procs[:1]
        for group in (workers, scheduler):  # a worker whose scheduler went first waits to reconnect
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    @contextlib.contextmanager
    def running(self) -> Iterator[DaskProcesses]:
        try:
            self.start()
            yield self
        finally:
            self.stop()
