"""Pass names: every pass class registers itself under its ``name`` when its module is imported.

Importing ``codesign.passes`` (which any import of a submodule does first) imports every pass module, so a
name resolves wherever the manager runs.
"""

from __future__ import annotations

from typing import Any, TypeVar

from codesign.errors import PassError

__all__ = ["pass_by_name", "pass_names", "register_pass"]

_PASSES: dict[str, type[Any]] = {}

P = TypeVar("P", bound=type[Any])


def register_pass(cls: P) -> P:
    """Class decorator: make ``cls`` reachable by its ``name`` (``PassManager(["cse"], ...)``)."""
    name = cls.name
    if name in _PASSES and _PASSES[name] is not cls:
        raise PassError(f"two passes are named {name!r}: {_PASSES[name].__qualname__} and {cls.__qualname__}")
    _PASSES[name] = cls
    return cls


def pass_names() -> list[str]:
    return sorted(_PASSES)


def pass_by_name(name: str) -> type[Any]:
    """The pass class registered under ``name`` (see ``pass_names()``)."""
    if not isinstance(name, str) or name not in _PASSES:
        raise PassError(f"unknown pass {name!r}", fix=f"choose from {pass_names()}")
    return _PASSES[name]
