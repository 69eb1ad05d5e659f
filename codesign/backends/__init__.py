"""Backends turn a Program into something runnable for a Target (``Backend.lower``).

Each backend lives in its own module, imported when first asked for (``get_backend`` or an
attribute of this package): a process that serves an eager bundle never imports the inductor or
TensorRT modules, and ``backend_names()`` needs none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from codesign.errors import BackendError
from codesign.lazy import lazy_exports

if TYPE_CHECKING:
    from codesign.backends.aoti import AotiBackend
    from codesign.backends.base import Backend, BackendConfig, Lowered
    from codesign.backends.eager import EagerBackend
    from codesign.backends.inductor import InductorBackend, InductorConfig
    from codesign.backends.tensorrt import TensorRTBackend, TensorRTConfig

__all__ = [
    "AotiBackend",
    "Backend",
    "BackendConfig",
    "EagerBackend",
    "InductorBackend",
    "InductorConfig",
    "Lowered",
    "TensorRTBackend",
    "TensorRTConfig",
    "backend_class",
    "backend_names",
    "get_backend",
]

# backend name -> (module, class); the class's ``name`` must equal the key (tests check it)
_BACKENDS: dict[str, tuple[str, str]] = {
    "aoti": ("codesign.backends.aoti", "AotiBackend"),
    "eager": ("codesign.backends.eager", "EagerBackend"),
    "inductor": ("codesign.backends.inductor", "InductorBackend"),
    "tensorrt": ("codesign.backends.tensorrt", "TensorRTBackend"),
}

# other public name -> the module that defines it
_LAZY: dict[str, str] = {
    **{cls: module for module, cls in _BACKENDS.values()},
    "Backend": "codesign.backends.base",
    "BackendConfig": "codesign.backends.base",
    "Lowered": "codesign.backends.base",
    "InductorConfig": "codesign.backends.inductor",
    "TensorRTConfig": "codesign.backends.tensorrt",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``, importing only its module."""
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}", fix=f"choose from {backend_names()}")
    module, cls = _BACKENDS[name]
    backend: type[Backend] = getattr(importlib.import_module(module), cls)
    return backend


def get_backend(name: str | Backend) -> Backend:
    """A backend instance by name (``eager``, ``inductor``, ``aoti``, ``tensorrt``) with its default config."""
    if isinstance(name, str):
        return backend_class(name)()
    from codesign.backends.base import Backend

    if isinstance(name, Backend):
        return name
    raise BackendError(f"a backend is a name or a Backend, got {type(name).__name__}")
