"""Virtual machines: the backend seam (`backend`) and its implementations.

`load_backend` is the only place a backend is chosen; the composition root
(`runner.compose`) calls it with ``vm.backend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from runner.errors import ConfigError
from runner.vm.backend import BackendContext, Hypervisor

BackendFactory = Callable[[BackendContext], Hypervisor]


def load_backend(name: str) -> BackendFactory:
    """The ``hypervisor`` factory of backend ``name``: ``runner.vm.<name>``, or a dotted
    module name of its own. ConfigError when it is missing or breaks the contract."""
    module_name = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigError("vm.backend", f"no VM backend {name!r} ({module_name})") from None
        raise
    factory = getattr(module, "hypervisor", None)
    if not callable(factory):
        raise ConfigError(
            "vm.backend", f"{module_name} has no hypervisor(context) function: not a VM backend"
        )
    return cast(BackendFactory, factory)
