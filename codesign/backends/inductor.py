"""Inductor backend: ``torch.compile`` of the graph with dynamic shapes; mode is a search knob.

The bundle stores the exported program; loading compiles it again (Inductor's own cache makes the
second compile on the same machine fast). For a self-contained compiled artifact use ``aoti``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from codesign.backends.base import Backend, Lowered
from codesign.config import Config, knob, register_config
from codesign.hardware.target import Target
from codesign.ir.program import Program

__all__ = ["INDUCTOR_MODES", "InductorBackend", "InductorConfig"]

INDUCTOR_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@register_config
@dataclasses.dataclass(frozen=True)
class InductorConfig(Config):
    mode: str = knob("default", choices=INDUCTOR_MODES, help="torch.compile mode")


class InductorBackend(Backend[InductorConfig]):
    name = "inductor"
    config_class = InductorConfig

    def _compile(self, module: torch.nn.Module) -> Callable[..., Any]:
        mode = self.config.mode
        return torch.compile(module, dynamic=True, mode=None if mode == "default" else mode)

    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        self.check_target(target)
        return Lowered(runner=self._compile(program.graph_module), exported=program.export())

    def load(self, exported: torch.export.ExportedProgram, files: Mapping[str, Path]) -> Callable[..., Any]:
        return self._compile(exported.module())
