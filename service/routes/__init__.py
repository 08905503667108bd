"""One router per concern: segmentation, health, the model, metrics, API docs."""

from __future__ import annotations

from . import docs, health, metrics, model, segment

__all__ = ["docs", "health", "metrics", "model", "segment"]
