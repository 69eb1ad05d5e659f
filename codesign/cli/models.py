"""Loading the model a command names (imported by handlers only: it imports torch)."""

from __future__ import annotations

import argparse
from typing import Any

from codesign.ir.workload import Workload, load_model_ref

__all__ = ["size_kwargs", "workload"]


def size_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The factory arguments the flags give (``--size``)."""
    return {"size": args.size} if getattr(args, "size", None) else {}


def workload(args: argparse.Namespace) -> Workload:
    """The Workload of ``args.model`` at ``args.size``."""
    return load_model_ref(args.model, **size_kwargs(args))
