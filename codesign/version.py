"""The library version, in a module of its own so that every layer can record it without importing the API."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
