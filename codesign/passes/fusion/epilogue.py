"""``fuse_linear_epilogue``: Linear + activation become ``codesign::fused_linear`` where the backend does not fuse."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from codesign.analysis import count_kernels
from codesign.config import Config, knob, register_config
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.passes.fusion.common import (
    kernels_stats,
)
from codesign.passes.graph_edit import (
    insert_call,
)
from codesign.passes.manager import Pass, PassResult, SkipKind
from codesign.passes.patterns import (
    epilogue_activation,
    linear_parts,
)
from codesign.passes.registry import register_pass

aten = torch.ops.aten

__all__ = ["EPILOGUE_MODES", "LinearEpilogueConfig", "LinearEpilogueFusion"]

EPILOGUE_MODES = ("gpu", "always", "never")


@register_config
@dataclasses.dataclass(frozen=True)
class LinearEpilogueConfig(Config):
    # "gpu": only on GPU targets (where codesign's Triton kernel runs); CPU gains nothing from it
    when: str = knob(
        "gpu",
        choices=EPILOGUE_MODES,
        help="rewrite Linear+activation to codesign::fused_linear: on GPU targets, always, never",
    )


@register_pass
class LinearEpilogueFusion(Pass[LinearEpilogueConfig]):
    """Linear + bias + activation -> ``codesign::fused_linear`` (one Triton kernel on CUDA).

    Inductor and AOTInductor fuse this epilogue themselves; the op is for the eager backend on a
    GPU and for backends that do not fuse (it is opaque to them, so on CPU it is left off).
    """

    name = "fuse_linear_epilogue"
    config_class = LinearEpilogueConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        when = self.config.when
        if when == "never" or (when == "gpu" and target.hardware.kind != "gpu"):
            return PassResult.skipped(
                program,
                SkipKind.DISABLED,
                f"when={when!r} on a {target.hardware.kind} target",
                fix="set when='always' to rewrite on any target",
            )
        kernels = count_kernels(program)
        graph = program.graph
        fused = 0
        for node in list(graph.nodes):
            if linear_parts(program, node) is None or (epilogue := epilogue_activation(node)) is None:
                continue
            act, name = epilogue
            bias = node.args[2] if len(node.args) > 2 else None
            with graph.inserting_before(act):
                op = insert_call(
                    graph, torch.ops.codesign.fused_linear.default, (node.args[0], node.args[1], bias, name)
                )
            op.meta = dict(act.meta)
            act.replace_all_uses_with(op)
            graph.erase_node(act)
            graph.erase_node(node)
            fused += 1
        if not fused:
            return PassResult.skipped(
                program, SkipKind.NOT_APPLICABLE, "no Linear followed by a fusable activation"
            )
        program.recompile()
        return PassResult(program, True, kernels_stats(kernels, program, linears_fused=fused))
