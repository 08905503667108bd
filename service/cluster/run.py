"""The client side of a cluster run: connect, plan the blocks, submit, assemble or commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from distributed import Client, Future, LocalCluster
from distributed.scheduler import KilledWorker

from tiling import TilePlan, TileSink
from tiling.blocks import BlockGrid, block_plan, block_size, plan_blocks
from tiling.rescale import RescaleBack
from unet import file_sha256, load_checkpoint

from ..errors import ClusterError, InputError
from ..io import ImageHeader
from ..pipeline import Options, Report, Route, choose_route, count_tiles, open_input, open_sink, plan_of, resolve
from ..segmenter import Segmenter
from ..sinks import Sink
from ..sources import TiffSource, is_ome_zarr
from .plugin import ModelPlugin
from .tasks import BlockTask, run_block

__all__ = ["DEFAULT_BLOCK_PX", "block_for", "connect", "segment_on_cluster"]

log = logging.getLogger(__name__)

DEFAULT_BLOCK_PX = 3072  # at least this many output pixels a side: 8 x 8 tiles of 384 (~9.4 Mpx per task)
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)  # one class since Python 3.11, two before
_POLL_S = 1.0  # while waiting for blocks, progress(0) this often: a cancel or a time limit is seen within it
_ZARR_CHUNK = 256  # the OME-Zarr sink's chunk side: blocks must not split a chunk


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None, *, timeout_s: float = 10.0) -> Iterator[Client]:
    """A client of the scheduler at ``scheduler`` (``tcp://host:8786``), else of a local cluster
    of ``workers`` processes with one thread each (closed on exit)."""
    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{timeout_s}s", set_as_default=False)
        except (OSError, *_TIMEOUTS) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        with client:
            log.info("scheduler %s; dashboard %s", scheduler, client.dashboard_link)
            yield client
        return
    n = workers or 1
    with (
        LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.WARNING
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        log.info("local cluster of %d worker(s); dashboard %s", n, client.dashboard_link)
        yield client


def block_for(plan: TilePlan, zarr_out: bool, block: int | None = None) -> int:
    """The block side for ``plan``: ``block`` (checked: a multiple of the stride of every axis
    with more than one tile, and of the OME-Zarr chunk when writing one), else the default.

    >>> from tiling import plan_tiles
    >>> block_for(plan_tiles((5000, 5000)), True), block_for(plan_tiles((5000, 300)), False, 768)
    (3072, 768)
    >>> block_for(plan_tiles((5000, 5000)), True, 1000)
    Traceback (most recent call last):
    ...
    service.errors.InputError: a block side must be a multiple of 768 (the tile stride 384 and the OME-Zarr chunk 256), got 1000: try 768 or 1536
    """
    strides = sorted({s for s, n in zip(plan.stride, plan.grid, strict=True) if n > 1})
    unit = math.lcm(*strides, *((_ZARR_CHUNK,) if zarr_out else ()))
    if block is None:
        return block_size(unit, at_least=DEFAULT_BLOCK_PX)
    if block < 1 or block % unit:
        lower = max(unit, block // unit * unit)
        parts = [f"the tile stride {' and '.join(map(str, strides))}"] if strides else []
        parts += [f"the OME-Zarr chunk {_ZARR_CHUNK}"] if zarr_out else []
        raise InputError(
            f"a block side must be a multiple of {unit} ({' and '.join(parts)}), got {block}: try {lower} or {lower + unit}"
        )
    return block


def _where(client: Client) -> str:
    scheduler = client.scheduler
    return str(getattr(scheduler, "address", None) or "the scheduler")


def _check_workers(client: Client, resources: dict[str, float] | None, timeout_s: float) -> None:
    where = _where(client)
    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except _TIMEOUTS:
        raise ClusterError(
            f"the Dask scheduler at {where} has no workers (none joined within {timeout_s:g} s)"
        ) from None
    if resources:
        workers = client.scheduler_info()["workers"].values()
        if not any(all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers):
            raise ClusterError(
                f"no worker of {where} offers the resources {resources}: start GPU workers with "
                "`dask worker ... --resources GPU=1` (or dask-cuda's LocalCUDACluster(resources={'GPU': 1}))"
            )


def _register(client: Client, plugin: ModelPlugin) -> None:
    try:
        client.register_plugin(plugin, name=plugin.name)
    except Exception as e:  # a worker's setup failed: its error, raised here
        with contextlib.suppress(Exception):  # else every worker that joins later would fail the same setup
            client.unregister_worker_plugin(plugin.name)
        raise ClusterError(f"a worker of {_where(client)} cannot load the model: {e}") from None


def _result(future: Future[Any], progress: Callable[[int], None] | None = None) -> Any:
    """The block's result; meanwhile ``progress(0)`` about once a second (where a cancel or a
    time limit raises, without waiting for a whole block)."""
    while True:
        try:
            try:
                return future.result(timeout=_POLL_S)
            except _TIMEOUTS:
                if not future.done():
                    if progress is not None:
                        progress(0)
                    continue
                # done: it finished as the wait ran out (a busy machine), or the task itself raised
                # a TimeoutError; its own outcome tells which
                return future.result()
        except KilledWorker as e:
            raise ClusterError(f"a block's task killed every worker that ran it: {e}") from None


def _run_plane(
    client: Client,
    tasks: list[BlockTask],
    assemble: TileSink | None,
    progress: Callable[[int], None] | None,
    resources: dict[str, float] | None,
    run_id: str,
) -> None:
    """Submit ``tasks``; hand their blocks to ``assemble`` in order (a window of them in flight),
    or (blocks written by the tasks) wait for all of them as they complete."""

    def submit(task: BlockTask) -> Future[Any]:
        key = f"unet-block-{run_id}-p{task.plane}-b{task.block.index}"
        return client.submit(run_block, task, key=key, pure=False, resources=resources)

    futures: list[Future[Any]] = []
    try:
        if assemble is None:
            futures = [submit(t) for t in tasks]
            by_key = {f.key: t for f, t in zip(futures, tasks, strict=True)}
            remaining, idle_since = list(futures), time.monotonic()
            while remaining:
                done = [f.done() for f in remaining]  # the client's own state: no round trip
                finished = [f for f, d in zip(remaining, done, strict=True) if d]
                for future in finished:
                    _result(future)
                    if progress is not None:
                        progress(by_key[future.key].tiles)
                if finished:
                    remaining = [f for f, d in zip(remaining, done, strict=True) if not d]
                    idle_since = time.monotonic()
                    continue
                time.sleep(0.05)
                if progress is not None and time.monotonic() - idle_since >= _POLL_S:
                    progress(0)
                    idle_since = time.monotonic()
            return
        window = max(2, 2 * sum(client.nthreads().values()))
        pending: deque[tuple[BlockTask, Future[Any]]] = deque()
        queue = iter(tasks)
        for task in queue:
            pending.append((task, submit(task)))
            futures.append(pending[-1][1])
            if len(pending) >= window:
                break
        while pending:
            task, future = pending.popleft()
            y = _result(future, progress)
            future.release()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, submit(nxt)))
                futures.append(pending[-1][1])
            assemble.add(task.block, y)
            if progress is not None:
                progress(task.tiles)
        assemble.finish()
    except BaseException:
        client.cancel([f for f in futures if not f.done()])
        raise


def segment_on_cluster(
    client: Client | Callable[[], AbstractContextManager[Client]],
    checkpoint: str | Path,
    src: str | Path,
    dst: str | Path | None,
    options: Options | None = None,
    *,
    into_input: bool = False,
    block: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int | None = None,
    backend: str = "auto",
    max_pixels: int | None = None,
    timeout_s: float = 30.0,
    progress: Callable[[int], None] | None = None,
    on_open: Callable[[ImageHeader, Route, int], None] | None = None,
) -> Report:
    """Segment ``src`` into ``dst`` on the cluster behind ``client`` (same outputs and checks as
    :func:`service.pipeline.segment_file`); the mask equals one machine's.

    ``client``: a connected client, or a function that gives one as a context manager (e.g.
    ``lambda: connect(workers=2)``), entered only once the input and options were checked.

    ``src``, ``checkpoint`` and an OME-Zarr ``dst`` must be at paths every worker can read (and
    write); a TIFF ``dst`` is written by this process from the blocks. ``device="cuda"``: the
    tasks ask for a ``GPU`` resource (one task per GPU at a time). ``progress(n)``: tiles done.
    """
    options = options or Options()
    if into_input == (dst is not None):
        raise InputError("give either an output path or into-input")
    target = Path(dst) if dst is not None else None
    if target is not None:
        if target.resolve() == Path(src).resolve():
            raise InputError("output path must differ from the input path")
        if not target.parent.is_dir():
            raise InputError(f"output directory does not exist: {target.parent}")
    zarr_out = into_input or (target is not None and is_ome_zarr(target))
    path = Path(checkpoint).resolve()
    local = Segmenter(
        load_checkpoint(path), device="cpu", backend="torch"
    )  # normalization, classes, checks: never runs the model
    sha256 = file_sha256(path)
    resources = {"GPU": 1.0} if device == "cuda" else None
    with contextlib.closing(open_input(src, series=options.series, max_pixels=max_pixels)) as source:
        header = source.header
        zarr_in = not isinstance(source, TiffSource)
        if into_input and not zarr_in:
            raise InputError("adding labels into the input needs an OME-Zarr input")
        if isinstance(source, TiffSource):
            source.windowed()  # this process reads only the normalization's sample
        route = choose_route(header, options, stream_above_mb=0, zarr_in=zarr_in, zarr_out=zarr_out)
        local.check(header)
        options = resolve(local, source, options)  # a size estimate runs here, on a crop
        plan = plan_of(local, header, options)
        side = block_for(plan, zarr_out, block)
        grid = plan_blocks(plan, side)
        plans = [block_plan(plan, b) for b in grid.tiles]
        planes = math.prod(header.stack_shape)
        if on_open is not None:
            on_open(header, route, sum(len(p) for p in plans) * planes)
        log.info(
            "%d blocks of %d px (%d tiles) per plane, %d plane(s), on %s",
            len(grid),
            side,
            count_tiles(local, header, options) // planes,
            planes,
            _where(client) if isinstance(client, Client) else "the cluster",
        )
        connected = contextlib.nullcontext(client) if isinstance(client, Client) else client()
        with connected as c:
            _check_workers(c, resources, timeout_s)
            plugin = ModelPlugin(
                path, sha256, device=device, precision=precision, batch_size=batch_size, backend=backend
            )
            _register(c, plugin)
            sink = open_sink(route, target, header, local, options, source=source, into_input=into_input)
            resolved = str(Path(src).resolve())
            _segment_blocks(c, sink, source, local, grid, plans, plugin.name, resolved, options, resources, progress)
        objects = getattr(sink, "count", None) if options.output == "instances" else None
        return Report(header, route, sum(len(p) for p in plans) * planes, objects, options.scale)


def _segment_blocks(
    client: Client,
    sink: Sink,
    source: Any,
    local: Segmenter,
    grid: BlockGrid,
    plans: list[Any],
    plugin: str,
    src: str,
    options: Options,
    resources: dict[str, float] | None,
    progress: Callable[[int], None] | None,
) -> None:
    run_id = uuid.uuid4().hex[:8]
    writer = None
    scale = options.scale
    scaled = scale.shape if scale is not None and scale.rescaled else None
    output = "probabilities" if scaled is not None else options.engine_output
    header = source.header
    try:
        if hasattr(sink, "block_writer") and scaled is None:
            writer = sink.block_writer(grid.tile_out, grid.grid)
        for i in range(math.prod(header.stack_shape)):
            affine = local.checkpoint.normalization.fit(source.plane(i))  # once per plane, for every block
            tasks = [
                BlockTask(plugin, src, options.series, i, b, p, affine, output, writer, scaled)
                for b, p in zip(grid.tiles, plans, strict=True)
            ]
            assemble: TileSink | None = None
            if scaled is not None:  # blocks of the rescaled image, mapped back here (tiling.rescale)
                back = RescaleBack(grid, (header.height, header.width), options.engine_output)
                assemble = back.connect(sink.plane(i, back.plan))
            elif writer is None:
                assemble = sink.plane(i, grid)
            _run_plane(client, tasks, assemble, progress, resources, run_id)
        if writer is not None:
            sink.finish_blocks(writer)  # type: ignore[attr-defined]
        else:
            sink.finish()
    except BaseException:
        sink.abort()
        raise
