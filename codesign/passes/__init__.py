"""Graph passes: each a ``Pass`` subclass with a registered config of knobs."""

from __future__ import annotations

from codesign.passes.cleanup import (
    CommonSubexpressionElimination,
    ConstantFolding,
    DeadCodeElimination,
    generic_passes,
)
from codesign.passes.request_sharing import RequestSharing, RequestSharingConfig

__all__ = [
    "CommonSubexpressionElimination",
    "ConstantFolding",
    "DeadCodeElimination",
    "RequestSharing",
    "RequestSharingConfig",
    "generic_passes",
    "pass_by_name",
]

_PASSES = {
    p.name: p for p in (DeadCodeElimination, CommonSubexpressionElimination, ConstantFolding, RequestSharing)
}


def pass_by_name(name: str) -> type:
    """The pass class registered under ``name`` (``dce``, ``cse``, ``constant_folding``, ``request_sharing``)."""
    from codesign.errors import PassError

    if name not in _PASSES:
        raise PassError(f"unknown pass {name!r}", fix=f"choose from {sorted(_PASSES)}")
    return _PASSES[name]
