"""The ``codesign`` command line: one module per command, dispatched by ``codesign.cli.app``."""

from __future__ import annotations

from codesign.cli.app import main

__all__ = ["main"]
