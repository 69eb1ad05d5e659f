"""Eager backend: run the (rewritten) FX graph op by op. The reference every backend is checked against."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from codesign.backends.base import Backend, BackendConfig, Lowered
from codesign.hardware.target import Target
from codesign.ir.program import Program

__all__ = ["EagerBackend"]


class EagerBackend(Backend[BackendConfig]):
    name = "eager"

    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        self.check_target(target)
        return Lowered(runner=program.graph_module, exported=program.export())

    def load(self, exported: torch.export.ExportedProgram, files: Mapping[str, Path]) -> Callable[..., Any]:
        return exported.module()
