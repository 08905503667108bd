"""Benchmarks of unet-tile: ``python -m bench`` (``make bench``).

One run measures, on one image, output megapixels per second and peak RSS of the bare
model (the ceiling), the engine, the CLI, the HTTP service, a naive tiling loop and
MONAI's ``sliding_window_inference``, each row in its own subprocess. See
:mod:`bench.run` for the options and :mod:`bench.rows` for what each row times.
Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

__all__: list[str] = []
