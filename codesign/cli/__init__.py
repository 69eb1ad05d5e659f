"""The ``codesign`` command line."""

from __future__ import annotations

from codesign.cli.main import main

__all__ = ["main"]
