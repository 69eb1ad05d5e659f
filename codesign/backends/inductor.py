"""Inductor backend: ``torch.compile`` of the graph with dynamic shapes; mode and freezing are knobs.

Guards on the graph module's own attributes are dropped (``module_guards=False``): the variant owns
that module and nothing else changes it, and checking its parameters costs a fixed ~0.1-0.5 ms per
call that the compiled nn.Module pays too (see docs/design.md, "Export tax").

The bundle stores the exported program; loading compiles it again (Inductor's own cache makes the
second compile on the same machine fast). For a self-contained compiled artifact use ``aoti``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx

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
    freezing: bool = knob(
        False,
        help="fold the weights into the compiled graph as constants (inference only; weights changed "
        "after the first call are not seen)",
    )
    decompose_ops: bool = knob(
        True,
        help="hand Inductor codesign's ops in aten form (codesign.ops.decompositions) so it fuses "
        "around them; off, they are extern kernels",
    )
    module_guards: bool = knob(
        False,
        help="re-check the module's attributes and parameters on every call (dynamo guards); the "
        "variant owns its graph module, so only the inputs' guards are needed",
    )


class InductorBackend(Backend[InductorConfig]):
    name = "inductor"
    config_class = InductorConfig

    def _compile(self, module: torch.fx.GraphModule) -> Callable[..., Any]:
        import torch._inductor  # the mode tables; imported here, not with codesign (about 2 s)

        cfg = self.config
        if cfg.decompose_ops:
            from codesign.ops.decompositions import decompose

            decompose(module)
        # a mode is a set of Inductor options: spelled out, so that freezing can be added to any mode
        options: dict[str, Any] = {**torch._inductor.list_mode_options(cfg.mode, dynamic=True)}
        if cfg.freezing:
            options["freezing"] = True
        if not cfg.module_guards:
            # dynamo guards every parameter of the module on each call (~0.3 ms for a DLRM's ~60 tensors)
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        return torch.compile(module, dynamic=True, options=options)

    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        self.check_target(target)
        # a graph of its own (parameters shared): decomposing must not change the program's graph
        module = torch.fx.GraphModule(program.graph_module, copy.deepcopy(program.graph_module.graph))
        return Lowered(runner=self._compile(module), exported=program.export())

    def load(
        self,
        exported: torch.export.ExportedProgram,
        files: Mapping[str, Path],
        example: Mapping[str, Any] | None = None,
    ) -> Callable[..., Any]:
        module = exported.module()
        assert isinstance(module, torch.fx.GraphModule)
        return self._compile(module)
