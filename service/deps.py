"""Typed dependencies of the routes (``Annotated[..., Depends(...)]`` aliases)."""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .http_errors import UnauthorizedError, UnavailableError
from .metrics import Metrics
from .segmenter import Segmenter
from .settings import Settings, get_settings
from .slots import DeviceSlots

__all__ = [
    "MetricsDep",
    "SegmenterDep",
    "ServiceState",
    "SettingsDep",
    "StateDep",
    "get_metrics",
    "get_segmenter",
    "get_state",
    "require_api_key",
]


@dataclass
class ServiceState:
    """Everything an app holds at run time; the model arrives in the lifespan."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    slots: DeviceSlots | None = None
    segmenter: Segmenter | None = None
    executor: ThreadPoolExecutor | None = None
    ready: bool = False
    startup_error: BaseException | None = None


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_segmenter(state: StateDep) -> Segmenter:
    if not state.ready or state.segmenter is None:
        raise UnavailableError("the model is not loaded (starting or shutting down); retry later", 1)
    return state.segmenter


SegmenterDep = Annotated[Segmenter, Depends(get_segmenter)]

_bearer = HTTPBearer(auto_error=False, description="the key in UNET_API_KEY (only when it is set)")


def require_api_key(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """When ``UNET_API_KEY`` is set, demand ``Authorization: Bearer <key>`` (constant-time compare)."""
    if settings.api_key is None:
        return
    if credentials is None:
        raise UnauthorizedError("missing credentials; expected the header 'Authorization: Bearer <API key>'")
    expected = settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise UnauthorizedError("invalid API key")
