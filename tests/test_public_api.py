"""Every module declares its public names in ``__all__``, and they match what it defines."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import service
import tiling
import unet


def _modules() -> list[str]:
    names = []
    for pkg in (unet, tiling, service):
        names.append(pkg.__name__)
        names += [
            m.name for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}.") if not m.name.endswith("__main__")
        ]
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_matches_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names undefined {missing}"
    defined_here = [
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == name
    ]
    assert not set(defined_here) - set(exported) - _PRIVATE_OK.get(name, set()), f"{name} public names not in __all__"


# helpers that are public by name but deliberately not exported
_PRIVATE_OK: dict[str, set[str]] = {}


def test_required_top_level_api() -> None:
    for n in ("UNetConfig", "UNet", "save_checkpoint", "load_checkpoint", "import_state_dict"):
        assert n in unet.__all__
    assert "segment" in tiling.__all__
