"""Segmenting on a Dask cluster gives one machine's output, bit for bit, on real clusters.

One module-scoped ``LocalCluster`` of two worker processes serves most tests; the test that
kills a worker has a cluster of its own, and one test starts ``dask scheduler`` and two
``dask worker`` processes and drives the real CLI against them. Every cluster output is
compared with :func:`service.pipeline.segment_file` on the same input (fp32 on the CPU):
TIFFs value for value, OME-Zarr stores group by group, every pyramid level of the labels and
of the copied image, chunk files included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from distributed import Client, LocalCluster
from scipy import ndimage

import service.cluster
import service.omezarr.sink
import unet
from service.cluster import BlockTask, ModelPlugin, run_block, segment_on_cluster
from service.cluster.run import _register, _result
from service.errors import ClusterError, InputError
from service.pipeline import Options, choose_route, open_input, open_sink, plan_of
from service.segmenter import Segmenter
from tests.service.cluster_helpers import (
    BIN,
    REPO,
    DaskProcesses,
    assert_same_store,
    chunk_files,
    make_image,
    read_back,
    reference,
    write_input,
)
from tests.service.conftest import balanced_model, free_port
from tiling.blocks import block_plan, plan_blocks

CPU = {"device": "cpu", "precision": "fp32"}


def new_cluster() -> LocalCluster:
    return LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with new_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random base-width-2 U-Net (depth 4: the default 388-px tiles and 384-px stride) whose
    head bias makes it predict both classes on noise; half the compute of width 4."""
    path = tmp_path_factory.mktemp("cluster-ckpt") / "w2.safetensors"
    unet.save_checkpoint(path, balanced_model(base_width=2), class_names=["background", "nucleus"])
    return path


def output_path(directory: Path, kind: str) -> Path | None:
    directory.mkdir(exist_ok=True)
    return None if kind == "into" else directory / ("mask.tif" if kind == "tif" else "mask.ome.zarr")


def out_options(kind: str, **kw: Any) -> Options:
    return Options(ngff=kind.removeprefix("zarr") if kind.startswith("zarr") else "0.4", **kw)


def assert_both_classes(labels: np.ndarray[Any, Any]) -> None:
    assert set(np.unique(labels).tolist()) == {0, 1}, "the masks compared should hold both classes"


def assert_only(directory: Path, *names: str) -> None:
    """``directory`` holds exactly ``names``: no temporary ``.part`` file or store left."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


def assert_zarr_outputs_equal(got: Path, want: Path, label_name: str = "unet") -> int:
    """Every group, array (all levels of labels and image) and chunk file equal; the store reads
    back with ome-zarr-py. Returns the number of levels."""
    assert_same_store(got, want)
    image, labels = read_back(got, label_name)
    assert_both_classes(np.asarray(labels.data[0]))
    assert np.asarray(image.data[0]).shape[-2:] == np.asarray(labels.data[0]).shape[-2:]
    return len(labels.data)


# --- odd shapes, every input and output kind ----------------------------------------------

CASES = [
    # (shape, pixel kind, block, input kind, output kind)
    pytest.param((1000, 1300), "uint8", 768, "tif", "tif", id="ragged-blocks-tif-to-tif"),
    pytest.param((300, 500), "uint16", None, "tif", "zarr0.4", id="one-block-tif-to-zarr"),
    pytest.param((1700, 60), "uint8", 768, "zarr0.5", "zarr0.5", id="narrow-zarr-to-zarr-v3"),
    # an axis of one tile (300 px wide: tile stride 304 there) takes any block side; the other axis's
    # stride (384) is what a block must be a multiple of
    pytest.param((1000, 300), "uint8", 768, "tif", "tif", id="one-tile-wide-ragged-rows"),
    pytest.param((900, 1700), "uint16", 768, "zarr0.4", "tif", id="non-square-zarr-to-tif"),
    pytest.param((800, 1100), "uint8", 768, "zarr0.4", "into", id="into-input-store"),
    pytest.param((3, 400, 500), "uint8", 384, "tif", "tif", id="zyx-stack-tif-to-tif"),
    pytest.param((2, 500, 900), "uint16", 768, "tif", "zarr0.4", id="zyx-stack-tif-to-zarr"),
    pytest.param((600, 700), "float32-nan", 384, "tif", "tif", id="nan-float32-tif-to-tif"),
    pytest.param(
        (3500, 3300), "uint8", None, "tif", "zarr0.4", id="levels-by-blocks-and-by-client", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize(("shape", "pixels", "block", "src_kind", "dst_kind"), CASES)
def test_cluster_output_equals_one_machine(
    tmp_path: Path,
    client: Client,
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    pixels: str,
    block: int | None,
    src_kind: str,
    dst_kind: str,
) -> None:
    image = make_image(shape, pixels)
    src = write_input(tmp_path / "in" / "img", image, src_kind)
    options = out_options(dst_kind, fill_holes=False)  # unfilled labels: the tasks write an OME-Zarr's blocks
    into = dst_kind == "into"
    want_src = src
    if into:  # two copies of the input store: one gets the single machine's labels, the other the cluster's
        want_src = tmp_path / "ref-in" / src.name
        shutil.copytree(src, want_src)
    want = output_path(tmp_path / "ref", dst_kind)
    reference(checkpoint, want_src, want, options, into_input=into)

    levels_by_blocks: list[int] = []
    finish_levels = service.omezarr.sink.finish_levels

    def observed(sink: Any, levels: int) -> None:  # records how many levels the tasks wrote themselves
        levels_by_blocks.append(levels)
        finish_levels(sink, levels)

    monkeypatch.setattr(service.omezarr.sink, "finish_levels", observed)
    got = output_path(tmp_path / "out", dst_kind)
    tiles: list[int] = []
    report = segment_on_cluster(
        client, checkpoint, src, got, options, into_input=into, block=block, progress=tiles.append, **CPU
    )
    assert sum(tiles) == report.tiles

    if dst_kind == "tif":
        assert got is not None and want is not None
        out, ref = tifffile.imread(got), tifffile.imread(want)
        assert out.shape == ref.shape == shape and out.dtype == ref.dtype == np.uint8
        np.testing.assert_array_equal(out, ref)
        assert_both_classes(ref)
        if pixels == "float32-nan":  # no data is background, in both
            assert (ref[np.isnan(image)] == 0).all()
        assert_only(tmp_path / "out", got.name)
        return
    if into:
        levels = assert_zarr_outputs_equal(src, want_src)
        assert_only(src / "labels", *(p.name for p in (want_src / "labels").iterdir()))
        assert_only(tmp_path / "out")
    else:
        assert got is not None and want is not None
        levels = assert_zarr_outputs_equal(got, want)
        assert_only(tmp_path / "out", got.name)
    assert len(levels_by_blocks) == 1 and 1 <= levels_by_blocks[0] <= levels
    if block is None and max(shape) > 3072:
        # 3072-px blocks are whole 256-px chunks at 1/1, 1/2 and 1/4 (not at 1/8): the tasks wrote
        # those levels, the client built 1/8 and 1/16 from 1/4
        assert levels == 5 and levels_by_blocks == [3]
    elif block is None:  # one block: it is whole chunks of every level, and wrote them all
        assert levels_by_blocks == [levels]


def test_probabilities_tiff_on_the_cluster(tmp_path: Path, client: Client, checkpoint: Path) -> None:
    src = write_input(tmp_path / "img", make_image((1000, 1300), "uint8", seed=4), "tif")
    options = Options(output="probabilities")
    reference(checkpoint, src, tmp_path / "ref.tif", options)
    segment_on_cluster(client, checkpoint, src, tmp_path / "out.tif", options, block=768, **CPU)
    out, ref = tifffile.imread(tmp_path / "out.tif"), tifffile.imread(tmp_path / "ref.tif")
    assert out.shape == ref.shape == (2, 1000, 1300) and out.dtype == ref.dtype == np.float32
    # the same tiles in other batches: scores agree to float rounding, classes exactly
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out.argmax(0), ref.argmax(0))
    assert_both_classes(ref.argmax(0))


@pytest.mark.parametrize("dst_kind", ["tif", "zarr0.4"])
def test_instances_on_the_cluster_equal_one_machine(
    tmp_path: Path, client: Client, checkpoint: Path, dst_kind: str
) -> None:
    """Blocks give the class labels; the client joins objects over block and band seams."""
    smooth = ndimage.gaussian_filter(make_image((1000, 1300), "uint8", seed=5).astype(np.float32), 3)
    src = write_input(tmp_path / "img", smooth.astype(np.float32), "tif")
    paths = {}
    for name in ("ref", "out"):
        d = tmp_path / name
        d.mkdir()
        options = out_options(dst_kind, output="instances", table=d / "t.csv", geojson=d / "s.geojson")
        paths[name] = (output_path(d, dst_kind), options)
    want, want_options = paths["ref"]
    got, got_options = paths["out"]
    ref = reference(checkpoint, src, want, want_options)
    report = segment_on_cluster(client, checkpoint, src, got, got_options, block=768, **CPU)
    assert report.objects == ref.objects and ref.objects is not None and ref.objects > 10
    assert got is not None and want is not None
    if dst_kind == "tif":
        np.testing.assert_array_equal(tifffile.imread(got), tifffile.imread(want))
    else:
        assert_same_store(got, want)
    for name in ("t.csv", "s.geojson"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert_only(tmp_path / "out", got.name, "t.csv", "s.geojson")


@pytest.mark.parametrize("dst_kind", ["tif", "zarr0.4"])
def test_filled_labels_on_the_cluster_equal_one_machine(
    tmp_path: Path, client: Client, checkpoint: Path, dst_kind: str
) -> None:
    """Labels with their holes filled (the default): the blocks come back and the client fills
    and writes them, as for instances."""
    src = write_input(tmp_path / "img", make_image((900, 1300), "uint8", seed=6), "tif")
    options = out_options(dst_kind)
    want, got = output_path(tmp_path / "ref", dst_kind), output_path(tmp_path / "out", dst_kind)
    reference(checkpoint, src, want, options)
    unfilled = output_path(tmp_path / "raw", dst_kind)
    reference(checkpoint, src, unfilled, dataclasses.replace(options, fill_holes=False))
    segment_on_cluster(client, checkpoint, src, got, options, block=768, **CPU)
    assert got is not None and want is not None and unfilled is not None
    if dst_kind == "tif":
        out, ref = tifffile.imread(got), tifffile.imread(want)
        np.testing.assert_array_equal(out, ref)
        assert (ref != tifffile.imread(unfilled)).any(), "the random model's masks should have holes to fill"
    else:
        assert_same_store(got, want)


def test_a_rescaled_image_on_the_cluster_equals_one_machine(tmp_path: Path, client: Client) -> None:
    """Blocks of the rescaled image computed on the workers, mapped back by the client."""
    path = tmp_path / "sized.safetensors"
    size = unet.ObjectSize(native=24.0, low=12.0, high=48.0)
    unet.save_checkpoint(path, balanced_model(base_width=2), class_names=["background", "nucleus"], size=size)
    src = write_input(tmp_path / "img", make_image((1000, 900), "uint8", seed=7), "tif")
    for kind in ("labels", "instances"):
        options = Options(output=kind, diameter=10.0)  # type: ignore[arg-type]  # enlarged 2.4x
        ref = reference(path, src, tmp_path / f"ref-{kind}.tif", options)
        got = segment_on_cluster(client, path, src, tmp_path / f"out-{kind}.tif", options, block=768, **CPU)
        assert got.scale == ref.scale and ref.scale is not None and ref.scale.factor == pytest.approx(2.4)
        out, want = tifffile.imread(tmp_path / f"out-{kind}.tif"), tifffile.imread(tmp_path / f"ref-{kind}.tif")
        assert out.shape == want.shape == (1000, 900)
        np.testing.assert_array_equal(out, want)


# --- a worker dies ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_case(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> tuple[Path, dict[str, Path]]:
    """A 2000x2000 image and one machine's TIFF and OME-Zarr outputs of it."""
    d = tmp_path_factory.mktemp("kill")
    src = write_input(d / "img", make_image((2000, 2000), "uint8", seed=5), "tif")
    refs = {"tif": d / "ref.tif", "zarr0.4": d / "ref.ome.zarr"}
    for path in refs.values():
        reference(checkpoint, src, path)
    return src, refs


@pytest.fixture(scope="module")
def kill_cluster() -> Iterator[LocalCluster]:
    """A cluster of its own for the tests that kill its workers (the module's stays whole)."""
    with new_cluster() as c:
        yield c


@pytest.mark.slow
@pytest.mark.parametrize(("dst_kind", "block"), [("tif", 384), ("zarr0.4", 768)])
def test_a_worker_killed_mid_run_changes_nothing(
    tmp_path: Path,
    kill_cluster: LocalCluster,
    checkpoint: Path,
    kill_case: tuple[Path, dict[str, Path]],
    dst_kind: str,
    block: int,
) -> None:
    """SIGKILL one of two workers after two blocks: its nanny starts another, the scheduler runs
    the dead one's blocks again (a TIFF's finished blocks it held are lost with it; an OME-Zarr's
    are rewritten), and the output is one machine's all the same."""
    src, refs = kill_case
    got = output_path(tmp_path / "out", dst_kind)
    assert got is not None
    with Client(kill_cluster, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=60)
        before: dict[str, int] = client.run(os.getpid)
        victim_address, victim = sorted(before.items())[0]
        done: list[int] = []

        def progress(tiles: int) -> None:
            if tiles == 0:  # the once-a-second heartbeat while waiting (where cancel is noticed), not a block
                return
            done.append(tiles)
            if len(done) == 2:
                os.kill(victim, signal.SIGKILL)

        report = segment_on_cluster(
            client, checkpoint, src, got, out_options(dst_kind), block=block, progress=progress, **CPU
        )
        after: dict[str, int] = client.run(os.getpid)
    blocks = math.ceil(2000 / block) ** 2
    assert len(done) == blocks and sum(done) == report.tiles  # every block once, though some ran twice
    assert victim not in after.values() and victim_address not in after  # it did die
    if dst_kind == "tif":
        ref = tifffile.imread(refs["tif"])
        np.testing.assert_array_equal(tifffile.imread(got), ref)
        assert_both_classes(ref)
    else:
        assert_zarr_outputs_equal(got, refs[dst_kind])
    assert_only(tmp_path / "out", got.name)


# --- separately started processes, the real CLI -------------------------------------------


@pytest.fixture(scope="module")
def dask_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskProcesses]:
    procs = DaskProcesses(tmp_path_factory.mktemp("dask"))
    with procs.running():
        try:
            with Client(procs.address, timeout="60s", set_as_default=False) as c:
                c.wait_for_workers(2, timeout=90)
        except Exception as e:
            raise RuntimeError(f"the dask processes did not come up: {e}\n{procs.log_text()}") from None
        yield procs


@pytest.fixture(scope="module")
def cli_input(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> tuple[Path, dict[str, Path]]:
    """A ragged 1000x1300 image and one machine's TIFF and OME-Zarr outputs of it."""
    d = tmp_path_factory.mktemp("cli")
    src = write_input(d / "img", make_image((1000, 1300), "uint8", seed=6), "tif")
    refs = {"tif": d / "ref.tif", "zarr0.4": d / "ref.ome.zarr"}
    for path in refs.values():
        reference(checkpoint, src, path)
    return src, refs


def unet_tile(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "UNET_"))}
    return subprocess.run(
        [str(BIN / "unet-tile"), "segment", *map(str, args)],
        cwd=REPO,
        env=base | (env or {}),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("dst_kind", "via"), [("tif", "--scheduler"), ("zarr0.4", "--scheduler"), ("tif", "env")])
def test_cli_on_separate_scheduler_and_worker_processes(
    tmp_path: Path,
    dask_processes: DaskProcesses,
    checkpoint: Path,
    cli_input: tuple[Path, dict[str, Path]],
    dst_kind: str,
    via: str,
) -> None:
    src, refs = cli_input
    got = output_path(tmp_path / "out", dst_kind)
    assert got is not None
    scheduler = ["--scheduler", dask_processes.address] if via == "--scheduler" else []
    env = {"DASK_SCHEDULER_ADDRESS": dask_processes.address} if via == "env" else {}
    args = ["--checkpoint", checkpoint, "--device", "cpu", "--precision", "fp32", "--block", "768", "-q"]
    done = unet_tile(src, "-o", got, *scheduler, *args, env=env)
    assert done.returncode == 0, done.stderr + dask_processes.log_text()
    assert done.stderr == ""
    if dst_kind == "tif":
        np.testing.assert_array_equal(tifffile.imread(got), tifffile.imread(refs["tif"]))
    else:
        assert_zarr_outputs_equal(got, refs[dst_kind])
    assert_only(tmp_path / "out", got.name)


# --- refusals: one line, exit 2, nothing left behind ----------------------------------------


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("unet-tile: error: "), stderr
    return lines[0]


@pytest.mark.slow
def test_cli_unreachable_scheduler(tmp_path: Path, checkpoint: Path) -> None:
    src = write_input(tmp_path / "img", make_image((200, 300), "uint8"), "tif")
    (tmp_path / "out").mkdir()
    address = f"tcp://127.0.0.1:{free_port()}"  # free: nothing listens there
    done = unet_tile(src, "-o", tmp_path / "out" / "mask.tif", "--scheduler", address, "--checkpoint", checkpoint, "-q")
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert address in line and "scheduler" in line
    assert_only(tmp_path / "out")


def test_cli_block_not_a_multiple_of_the_stride_is_refused_before_any_cluster(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import main

    started: list[object] = []
    connect = service.cluster.connect
    monkeypatch.setattr(service.cluster, "connect", lambda *a, **kw: started.append(a) or connect(*a, **kw))
    src = write_input(tmp_path / "img", make_image((1000, 1300), "uint8"), "tif")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "mask.tif"
    code = main(f"segment {src} -o {out} --workers 1 --block 1000 --checkpoint {checkpoint} -q".split())
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "multiple of 384" in line and "1000" in line
    assert started == []  # no cluster was asked for
    assert_only(tmp_path / "out")


def test_input_a_worker_cannot_open(tmp_path: Path, client: Client, checkpoint: Path) -> None:
    """The client read the input; the worker finds no file at the path (no shared filesystem)."""
    src = write_input(tmp_path / "img", make_image((900, 900), "uint8"), "tif")
    missing = tmp_path / "elsewhere" / "img.tif"
    with one_block(client, checkpoint, src) as (task, _):
        future = client.submit(run_block, dataclasses.replace(task, input=str(missing)), pure=False)
        with pytest.raises(InputError) as e:
            future.result()
    message = str(e.value)
    assert "\n" not in message and str(missing) in message, message
    assert any(message.startswith(f"worker {w}: ") for w in client.scheduler_info()["workers"]), message


def test_a_worker_with_another_checkpoint_is_refused(client: Client, checkpoint: Path) -> None:
    plugin = ModelPlugin(checkpoint, "0" * 64, **CPU)  # the client's sha256 of "its" file
    with pytest.raises(ClusterError) as e:
        _register(client, plugin)
    # the failed plugin is not left registered (every worker joining later would fail its setup again)
    assert not any(plugin.name in names for names in client.run(lambda dask_worker: list(dask_worker.plugins)).values())
    with pytest.raises(ValueError, match="does not exist"):
        client.unregister_worker_plugin(plugin.name)
    message = str(e.value)
    assert "sha256" in message and str(checkpoint) in message and "same file" in message, message
    assert unet.file_sha256(checkpoint)[:12] in message and "000000000000" in message  # what each side has
    assert client.scheduler is not None and client.scheduler.address in message


def test_cuda_without_gpu_workers_is_refused_before_any_task(tmp_path: Path, client: Client, checkpoint: Path) -> None:
    src = write_input(tmp_path / "img", make_image((200, 300), "uint8"), "tif")
    (tmp_path / "out").mkdir()
    with pytest.raises(ClusterError) as e:
        segment_on_cluster(client, checkpoint, src, tmp_path / "out" / "mask.tif", device="cuda", precision="fp32")
    message = str(e.value)
    assert "--resources GPU=1" in message and client.scheduler is not None and client.scheduler.address in message
    assert_only(tmp_path / "out")


# --- a task run twice -----------------------------------------------------------------------


@contextlib.contextmanager
def one_block(
    client: Client, checkpoint: Path, src: Path, out: Path | None = None, *, block: int = 768, index: int = 0
) -> Iterator[tuple[BlockTask, Any]]:
    """The task of block ``index`` of ``src`` as :func:`segment_on_cluster` makes it (its model
    registered on the workers), writing into a new OME-Zarr store at ``out`` (its temporary
    tree, aborted at the end) when given; yields it and its writer."""
    local = Segmenter(unet.load_checkpoint(checkpoint), device="cpu")
    options = Options(fill_holes=False)  # a block writer: what segment_on_cluster uses when no pass spans blocks
    plugin = ModelPlugin(checkpoint, unet.file_sha256(checkpoint), **CPU)
    _register(client, plugin)
    with open_input(src) as source:
        source.windowed()
        plan = plan_of(local, source.header, options)
        grid = plan_blocks(plan, block)
        sink, writer = None, None
        if out is not None:
            route = choose_route(source.header, options, stream_above_mb=0, zarr_out=True)
            sink = open_sink(route, out, source.header, local, options, source=source)
            writer = sink.block_writer(grid.tile_out, grid.grid)  # type: ignore[attr-defined]
        try:
            b = grid.tiles[index]
            affine = local.checkpoint.normalization.fit(source.plane(0))
            yield BlockTask(plugin.name, str(src), 0, 0, b, block_plan(plan, b), affine, "labels", writer), writer
        finally:
            if sink is not None:
                sink.abort()


def test_a_block_run_twice_rewrites_the_same_chunks(tmp_path: Path, client: Client, checkpoint: Path) -> None:
    """What a retry after a worker's death does: the same block again, here on the other worker."""
    src = write_input(tmp_path / "img", make_image((1600, 1700), "uint8", seed=8), "tif")
    reference(checkpoint, src, tmp_path / "ref.ome.zarr", Options(fill_holes=False))
    workers = sorted(client.scheduler_info()["workers"])
    out = tmp_path / "out.ome.zarr"
    with one_block(client, checkpoint, src, out, index=4) as (task, writer):  # the middle block of 3 x 3
        (store,) = tmp_path.glob("*.part")

        def run_on(worker: str) -> dict[str, tuple[bytes, int]]:
            assert client.submit(run_block, task, pure=False, workers=[worker]).result() is None
            return {n: ((store / n).read_bytes(), (store / n).stat().st_mtime_ns) for n in chunk_files(store)}

        first = run_on(workers[0])
        second = run_on(workers[1])
        labels = np.asarray(writer.label_arrays[0][task.block.dest])
    assert first and set(first) == set(second)
    assert {n: b for n, (b, _) in first.items()} == {n: b for n, (b, _) in second.items()}
    assert all(second[n][1] > first[n][1] for n in first)  # rewritten, not skipped
    assert any(n.startswith("labels/unet/0/") for n in first) and any(n.startswith("0/") for n in first)
    ref = np.asarray(zarr.open_array(str(tmp_path / "ref.ome.zarr" / "labels" / "unet" / "0"), mode="r")[...])
    np.testing.assert_array_equal(labels, ref[task.block.dest])
    assert_both_classes(labels)
    assert_only(tmp_path, "img.tif", "ref.ome.zarr")  # the aborted store is gone


class _FinishedAsTheWaitRanOut:
    """A future whose wait times out at the moment it finishes (a busy machine)."""

    def __init__(self, outcome: Any) -> None:
        self.outcome, self.waits = outcome, 0

    def result(self, timeout: float | None = None) -> Any:
        if timeout is not None:
            self.waits += 1
            raise TimeoutError(f"timed out after {timeout} s.")
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def done(self) -> bool:
        return self.waits > 0


def test_a_block_that_finishes_as_the_wait_runs_out_is_its_result() -> None:
    """Regression: a job on a loaded machine failed with distributed's 'timed out after 1 s.'
    because a block that finished just as the 1 s wait ran out was taken for a task that
    raised a TimeoutError itself."""
    beats: list[int] = []
    assert _result(_FinishedAsTheWaitRanOut("labels"), beats.append) == "labels"  # type: ignore[arg-type]
    assert beats == []  # it was done: no heartbeat, no second wait
    with pytest.raises(TimeoutError, match="the task's own"):  # a task's own TimeoutError still fails the run
        _result(_FinishedAsTheWaitRanOut(TimeoutError("the task's own")))  # type: ignore[arg-type]
