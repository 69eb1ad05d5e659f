"""Backends turn a Program into something runnable for a Target (``Backend.lower``)."""

from __future__ import annotations

from codesign.backends.aoti import AotiBackend
from codesign.backends.base import Backend, BackendConfig, Lowered
from codesign.backends.eager import EagerBackend
from codesign.backends.inductor import InductorBackend, InductorConfig
from codesign.backends.tensorrt import TensorRTBackend, TensorRTConfig
from codesign.errors import BackendError

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
    "backend_names",
    "get_backend",
]

_BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (EagerBackend, InductorBackend, AotiBackend, TensorRTBackend)
}


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str | Backend) -> Backend:
    """A backend instance by name (``eager``, ``inductor``, ``aoti``, ``tensorrt``) with its default config."""
    if isinstance(name, Backend):
        return name
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}", fix=f"choose from {backend_names()}")
    return _BACKENDS[name]()
