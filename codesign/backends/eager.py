"""Eager backend: run the (rewritten) FX graph op by op. The reference every backend is checked against.

Its ops are called through torch's Python bindings (``backends.bindings``): the exported graph's
``OpOverload`` calls cost ~5-10 µs more each, which made the captured graph slower than the module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from codesign.backends.base import Backend, BackendConfig, Lowered
from codesign.backends.bindings import DirectCall, direct_call, lean_graph_module
from codesign.backends.entry import fast_entry
from codesign.hardware.target import Target
from codesign.ir.program import Program

__all__ = ["EagerBackend"]


class EagerBackend(Backend[BackendConfig]):
    name = "eager"

    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        self.check_target(target)
        examples = [program.call_inputs(program.example)]
        runner = _entry(lean_graph_module(program.graph_module, examples), examples)
        return Lowered(runner=runner, exported=program.export())

    def load(
        self,
        exported: torch.export.ExportedProgram,
        files: Mapping[str, Path],
        example: Mapping[str, Any] | None = None,
    ) -> Callable[..., Any]:
        module = exported.module()
        if example is None or not isinstance(module, torch.fx.GraphModule):
            return module
        return _entry(lean_graph_module(module, [example]), [example])


def _entry(module: torch.fx.GraphModule, examples: Sequence[Mapping[str, Any]]) -> Callable[..., Any]:
    """The module's call past its hooks (``DirectCall``) and, where that is all they do (or it has
    none: a rewritten graph's module), past its per-call flatten and shape guards (``entry.fast_entry``)."""
    call = direct_call(module)
    hooked = module._forward_pre_hooks or module._forward_hooks
    return fast_entry(module, call, examples) if isinstance(call, DirectCall) or not hooked else call
