"""``fuse_shared_input_linears``: Linears reading one input become one GEMM and a split."""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from typing import Any, ClassVar

import torch
import torch.fx

from codesign.analysis import count_kernels, node_value
from codesign.config import Config, knob, register_config
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.numerics import Tolerance
from codesign.passes.fusion.common import (
    REORDERED,
    independent_groups,
    kernels_stats,
    latest,
    replace_with_slices,
)
from codesign.passes.graph_edit import (
    finish_rewrite,
    insert_call,
    register_constant,
    weights_read,
)
from codesign.passes.manager import Pass, PassResult, SkipKind
from codesign.passes.patterns import (
    linear_parts,
)
from codesign.passes.registry import register_pass

aten = torch.ops.aten

__all__ = ["SharedInputLinearConfig", "SharedInputLinearFusion"]


@register_config
@dataclasses.dataclass(frozen=True)
class SharedInputLinearConfig(Config):
    min_group: int = knob(2, low=2, high=16, help="fewest Linears on one input fused into one GEMM")


def _shared_input_key(program: Program, node: torch.fx.Node) -> tuple[Any, ...] | None:
    """Linears with equal keys can share one GEMM: same input and dtype (and, for broadcast_linear,
    the same request index and activation; their per-request rows are concatenated too)."""
    parts = linear_parts(program, node)
    if parts is None:
        return None
    if node.target is aten.linear.default:
        return ("linear", parts[0], parts[1].dtype)
    row = node_value(node.args[3])
    if row is None or row.dim() != 2:
        return None
    return ("broadcast_linear", parts[0], parts[1].dtype, node.args[4], node.args[5])


@register_pass
class SharedInputLinearFusion(Pass[SharedInputLinearConfig]):
    """Linears reading the same input -> one Linear over concatenated weights, then a split."""

    name = "fuse_shared_input_linears"
    config_class = SharedInputLinearConfig
    tolerance: ClassVar[Tolerance] = REORDERED

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg = self.config
        kernels = count_kernels(program)
        groups: dict[tuple[Any, ...], list[torch.fx.Node]] = defaultdict(list)
        for node in program.graph.nodes:
            key = _shared_input_key(program, node)
            if key is not None:
                groups[key].append(node)
        fused = [
            g
            for members in groups.values()
            for g in independent_groups(members, program.graph, lambda group, node: True)
            if len(g) >= cfg.min_group
        ]
        if not fused:
            return PassResult.skipped(program, SkipKind.NOT_APPLICABLE, "no two Linears read the same input")
        for members in fused:
            _fuse_shared_input(program, members)
        out = finish_rewrite(program)
        return PassResult(
            out,
            True,
            kernels_stats(kernels, out, groups=len(fused), linears_fused=sum(len(g) for g in fused)),
        )


def _fuse_shared_input(program: Program, members: list[torch.fx.Node]) -> None:
    graph = program.graph
    parts = [p for m in members if (p := linear_parts(program, m)) is not None]
    x = parts[0][0]
    weights = [p[1] for p in parts]
    sources = weights_read(members)
    w = register_constant(
        program, f"_fused_{members[0].name}_weight", torch.cat([t.detach() for t in weights]), sources
    )
    bias = None
    if any(p[2] is not None for p in parts):
        b = torch.cat(
            [
                p[2].detach() if p[2] is not None else weights[i].new_zeros(weights[i].shape[0])
                for i, p in enumerate(parts)
            ]
        )
        bias = register_constant(program, f"_fused_{members[0].name}_bias", b, sources)
    target: Any = members[0].target
    if target is aten.linear.default:
        args: tuple[Any, ...] = (x, w, bias)
    else:  # broadcast_linear: the per-request rows are concatenated like the weights
        rows = [m.args[3] for m in members if isinstance(m.args[3], torch.fx.Node)]
        with graph.inserting_after(latest(graph, rows)):
            row = insert_call(graph, aten.cat.default, (rows, -1))
        args = (x, w, bias, row, *members[0].args[4:])
    with graph.inserting_before(members[0]):
        gemm = insert_call(graph, target, args)
        split = insert_call(
            graph, aten.split_with_sizes.default, (gemm, [int(t.shape[0]) for t in weights], -1)
        )
        slices = [insert_call(graph, operator.getitem, (split, i)) for i in range(len(members))]
    replace_with_slices(graph, members, slices)
