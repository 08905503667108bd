"""The model on each Dask worker: loaded once by a ``WorkerPlugin``, never shipped in the graph.

:class:`ModelPlugin` carries the checkpoint's *path* and *sha256* (a few hundred bytes); its
``setup`` runs on every worker when :meth:`distributed.Client.register_plugin` registers it
(and on every worker that joins later, or restarts after a crash). It checks the file's
sha256 (a worker that sees another file at that path refuses, rather than segmenting with
another model), loads it strictly (:func:`unet.load_checkpoint`), and keeps the
:class:`~service.segmenter.Segmenter` and a small cache of opened inputs for the tasks
(:func:`worker_state`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin, get_worker

from unet import CheckpointError, file_sha256, load_checkpoint

from ..errors import InputError
from ..pipeline import open_input
from ..segmenter import Segmenter
from ..sources import Source, TiffSource

__all__ = ["ModelPlugin", "WorkerState", "plugin_name", "worker_state"]

log = logging.getLogger(__name__)

_OPEN_INPUTS = 4  # inputs a worker keeps open between tasks (a run's tasks on one thread share one)


def plugin_name(
    sha256: str, device: str = "auto", precision: str = "fp32", batch_size: int | None = None, backend: str = "auto"
) -> str:
    """The plugin's name on a cluster: one per checkpoint and settings, so runs of two models
    (or precisions) can share workers.

    >>> plugin_name("ab" * 32)
    'unet-tile-model-abababababab-auto-auto-fp32-b0'
    """
    return f"unet-tile-model-{sha256[:12]}-{device}-{backend}-{precision}-b{batch_size or 0}"


class WorkerState:
    """What one worker keeps between tasks: the segmenter and the last few opened inputs."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self._inputs: OrderedDict[tuple[str, int, int, int, int], Source] = OrderedDict()
        self._lock = threading.Lock()

    def source(self, path: str, series: int) -> Source:
        """The input at ``path``, parsed once per worker thread (readers are not shared between
        threads) while its size and mtime stay the same."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError as e:
            raise InputError(f"cannot open the input {path}: {e.strerror or e}") from None
        key = (str(p), series, st.st_mtime_ns, st.st_size, threading.get_ident())  # a file handle per task thread
        with self._lock:
            if key in self._inputs:
                self._inputs.move_to_end(key)
                return self._inputs[key]
            source = open_input(p, series=series)
            if isinstance(source, TiffSource):
                source.windowed()  # TiffSource: read window by window, never decoded whole
            self._inputs[key] = source
            while len(self._inputs) > _OPEN_INPUTS:
                _, old = self._inputs.popitem(last=False)
                with contextlib.suppress(Exception):
                    old.close()
            return source

    def close(self) -> None:
        with self._lock:
            for source in self._inputs.values():
                with contextlib.suppress(Exception):
                    source.close()
            self._inputs.clear()


class ModelPlugin(WorkerPlugin):
    """Loads the checkpoint at ``path`` (whose sha256 must be ``sha256``) once per worker.

    ``device``/``precision``/``batch_size``/``backend`` as for :class:`~service.segmenter.Segmenter`
    (``device="auto"``: the worker's GPU where it has one). The path must name the same file
    on every worker (a shared filesystem, or the same image baked into every container).
    """

    idempotent = True  # registering it again (another run of the same model) keeps the loaded one

    def __init__(
        self,
        path: str | Path,
        sha256: str,
        *,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        self.path, self.sha256 = str(path), sha256
        self.device, self.precision, self.batch_size, self.backend = device, precision, batch_size, backend
        self.name = plugin_name(sha256, device, precision, batch_size, backend)
        self.state: WorkerState | None = None

    def setup(self, worker: Any) -> None:
        where = getattr(worker, "address", "a worker")
        try:
            found = file_sha256(self.path)
        except OSError as e:
            raise CheckpointError(f"worker {where} cannot read the checkpoint {self.path}: {e.strerror or e}") from None
        if found != self.sha256:
            raise CheckpointError(
                f"worker {where}: the checkpoint at {self.path} has sha256 {found[:12]}..., the client's has "
                f"{self.sha256[:12]}...: give every worker the same file"
            )
        checkpoint = load_checkpoint(self.path)
        segmenter = Segmenter(
            checkpoint, device=self.device, precision=self.precision, batch_size=self.batch_size, backend=self.backend
        )
        self.state = WorkerState(segmenter)
        predictor = segmenter.predictor
        log.info("worker %s: model %s on %s (%s)", where, self.sha256[:12], predictor.device, predictor.backend)

    def teardown(self, worker: Any) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None


def worker_state(name: str) -> WorkerState:
    """The state the :class:`ModelPlugin` called ``name`` made on this worker (in a task)."""
    worker = get_worker()
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, ModelPlugin) or plugin.state is None:
        raise CheckpointError(f"worker {worker.address} has no model {name}: register its ModelPlugin first")
    return plugin.state
