"""OME-Zarr (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3): a source to segment and a sink for labels.

- :class:`OmeZarrSource` (:mod:`.source`): level 0 of an image group's first multiscales, read
  window by window (each :meth:`~OmeZarrSource.plane` is a :class:`~service.sources.PlaneView`
  over the level-0 ``zarr.Array``), with its axes, physical scale and pyramid described;
- :class:`OmeZarrSink` (:mod:`.sink`): uint8 class labels as ``labels/<name>``, a multiscales
  pyramid with ``image-label`` metadata (colors, class names, source), either in a **new store**
  that also holds a copy of the image (with its own pyramid), or added **into the input's own
  store**.

:func:`service.sources.is_ome_zarr` tells whether a path names a zarr store (a directory holding
a zarr group). Private to the package: :mod:`._metadata`, the NGFF constants and metadata helpers
both use; :mod:`._pyramid`, the sink's level layout and the writers that feed every level.
:mod:`.blocks`: :class:`BlockWriter`, with which cluster tasks write their own blocks into a
sink's store (:meth:`OmeZarrSink.block_writer`, :meth:`OmeZarrSink.finish_blocks`).

Metadata is read with ome-zarr-py's location and validators (:func:`ome_zarr.io.parse_url`,
:class:`ome_zarr.axes.Axes`, ``Format.validate_coordinate_transformations``) and written with
its writers (:func:`ome_zarr.writer.write_multiscales_metadata`,
:func:`ome_zarr.writer.write_label_metadata`). Pixels go through zarr directly: the sink writes
each chunk of every array exactly once, in whole chunk rows as bands of the mask arrive, so
memory stays O(chunk rows x width) per pyramid level and no chunk is read back.
"""

from __future__ import annotations

from .blocks import BlockWriter
from .sink import OmeZarrSink
from .source import OmeZarrSource

__all__ = ["BlockWriter", "OmeZarrSink", "OmeZarrSource"]
