"""``fuse_parallel_linears``: equal-shape Linears on independent inputs become one batched GEMM."""

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
)
from codesign.passes.graph_edit import (
    finish_rewrite,
    insert_call,
    list_arg,
    register_constant,
    stable_topological_sort,
    weights_read,
)
from codesign.passes.manager import GAIN_HELP, Pass, PassResult, SkipKind
from codesign.passes.patterns import (
    UNARY_ACTIVATIONS,
    linear_parts,
)
from codesign.passes.registry import register_pass

aten = torch.ops.aten

__all__ = ["ParallelLinearConfig", "ParallelLinearFusion"]


@register_config
@dataclasses.dataclass(frozen=True)
class ParallelLinearConfig(Config):
    min_group: int = knob(2, low=2, high=16, help="fewest parallel Linears batched into one GEMM")
    # stacking copies the inputs
    require_predicted_gain: bool = knob(True, help=GAIN_HELP)


_MAX_ROUNDS = 256
# Elementwise ops whose only tensor input is the value itself: the same on a stack as on each slice.
_HOISTABLE = (*UNARY_ACTIVATIONS, aten.silu.default, aten.neg.default, aten.exp.default)
_GROUPS = "codesign_groups"  # meta key: number of slices of an unbind this pass created


@register_pass
class ParallelLinearFusion(Pass[ParallelLinearConfig]):
    """Equal-shape Linears on independent inputs -> one ``baddbmm`` over stacked inputs.

    Then, until nothing changes: an activation applied to every slice of a batch is applied once
    to the batch, and ``stack`` of a batch's slices in order is the batch itself. Parallel towers
    (one per task) become one chain of batched kernels.
    """

    name = "fuse_parallel_linears"
    config_class = ParallelLinearConfig
    tolerance: ClassVar[Tolerance] = REORDERED

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg = self.config
        kernels = count_kernels(program)
        batched = hoisted = cancelled = 0
        for _ in range(_MAX_ROUNDS):
            step = _batch_parallel_linears(program, cfg.min_group)
            if step:
                stable_topological_sort(program.graph)
            h, c = _hoist_pointwise(program.graph), _cancel_stack_of_slices(program.graph)
            batched, hoisted, cancelled = batched + step, hoisted + h, cancelled + c
            if not (step or h or c):
                break
        if not batched:
            return PassResult.skipped(program, SkipKind.NOT_APPLICABLE, "no parallel Linears of equal shape")
        out = finish_rewrite(program)
        stats = kernels_stats(
            kernels, out, linears_batched=batched, activations_batched=hoisted, stacks_removed=cancelled
        )
        return PassResult(out, True, stats)


def _batch_parallel_linears(program: Program, min_group: int) -> int:
    """One round: group independent Linears by (weight shape, dtype, bias, input shape); returns Linears batched."""
    graph = program.graph
    found: dict[tuple[Any, ...], list[torch.fx.Node]] = defaultdict(list)
    parts: dict[torch.fx.Node, tuple[Any, torch.Tensor, torch.Tensor | None]] = {}
    for node in graph.nodes:
        p = linear_parts(program, node)
        x_val = node_value(p[0]) if p is not None else None
        if p is None or x_val is None or x_val.dim() != 2:
            continue
        parts[node] = p
        key = (
            tuple(p[1].shape),
            p[1].dtype,
            p[2] is not None,
            tuple(str(d) for d in x_val.shape),
            x_val.dtype,
        )
        found[key].append(node)

    def distinct_input(group: list[torch.fx.Node], node: torch.fx.Node) -> bool:
        return all(parts[m][0] is not parts[node][0] for m in group)

    for members in found.values():
        for group in independent_groups(members, graph, distinct_input):
            if len(group) >= min_group:
                # one group per round: batching adds dependencies, so the next grouping needs fresh ancestry
                _batch(program, group, [parts[m] for m in group])
                return len(group)
    return 0


def _batch(
    program: Program, members: list[torch.fx.Node], parts: list[tuple[Any, torch.Tensor, Any]]
) -> None:
    graph = program.graph
    name = members[0].name
    sources = weights_read(members)
    w = register_constant(
        program, f"_batched_{name}_weight", torch.stack([p[1].detach().t() for p in parts]), sources
    )
    bias = None
    if parts[0][2] is not None:
        bias = register_constant(
            program, f"_batched_{name}_bias", torch.stack([p[2].detach()[None, :] for p in parts]), sources
        )
    inputs = [p[0] for p in parts]
    with graph.inserting_after(latest(graph, inputs)):
        stacked = insert_call(graph, aten.stack.default, (inputs, 0))
    with graph.inserting_after(stacked):
        if bias is None:
            gemm = insert_call(graph, aten.bmm.default, (stacked, w))
        else:  # baddbmm's shape rule cannot broadcast over symbolic rows: expand the bias first (a view)
            rows = insert_call(graph, aten.sym_size.int, (stacked, 1))
            groups, width = len(members), int(parts[0][1].shape[0])
            expanded = insert_call(graph, aten.expand.default, (bias, [groups, rows, width]))
            gemm = insert_call(graph, aten.baddbmm.default, (expanded, stacked, w))
    with graph.inserting_after(gemm):
        slices = _unbind(graph, gemm, len(members))
    for member, value in zip(members, slices, strict=True):
        member.replace_all_uses_with(value)
        graph.erase_node(member)


def _unbind(graph: torch.fx.Graph, batch: torch.fx.Node, groups: int) -> list[torch.fx.Node]:
    unbind = insert_call(graph, aten.unbind.int, (batch, 0))
    unbind.meta[_GROUPS] = groups
    with graph.inserting_after(unbind):
        return [insert_call(graph, operator.getitem, (unbind, i)) for i in range(groups)]


def _slices(unbind: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The getitem nodes of an unbind this pass made, in slice order (None if one is missing)."""
    groups = unbind.meta.get(_GROUPS)
    if unbind.target is not aten.unbind.int or groups is None:
        return None
    items = {u.args[1]: u for u in unbind.users if u.target is operator.getitem}
    return [items[i] for i in range(groups)] if len(items) == groups else None


def _hoist_pointwise(graph: torch.fx.Graph) -> int:
    """``op(slice_i)`` for every slice of a batch -> slices of ``op(batch)``."""
    hoisted = 0
    for unbind in [n for n in graph.nodes if n.meta.get(_GROUPS)]:
        slices = _slices(unbind)
        if slices is None:
            continue
        for target in _HOISTABLE:
            users = [
                next((u for u in s.users if u.target is target and u.args == (s,)), None) for s in slices
            ]
            found = [u for u in users if u is not None]
            if len(found) != len(slices) or len({repr(u.kwargs) for u in found}) != 1:
                continue
            with graph.inserting_after(unbind):
                applied = insert_call(graph, target, (unbind.args[0],), dict(found[0].kwargs))
            with graph.inserting_after(applied):
                new_slices = _unbind(graph, applied, len(slices))
            for old, new in zip(found, new_slices, strict=True):
                old.replace_all_uses_with(new)
                graph.erase_node(old)
            hoisted += 1
    return hoisted


def _cancel_stack_of_slices(graph: torch.fx.Graph) -> int:
    """``stack([unbind(b)[0], ..., unbind(b)[G-1]], 0)`` -> ``b``."""
    cancelled = 0
    for node in list(graph.nodes):
        if node.target is not aten.stack.default or (len(node.args) > 1 and node.args[1] != 0):
            continue
        items = list_arg(node, 0)
        first = items[0] if items else None
        if not isinstance(first, torch.fx.Node) or first.target is not operator.getitem:
            continue
        unbind = first.args[0]
        if not isinstance(unbind, torch.fx.Node) or _slices(unbind) != items:
            continue
        batch = unbind.args[0]
        if not isinstance(batch, torch.fx.Node):
            continue
        node.replace_all_uses_with(batch)
        graph.erase_node(node)
        cancelled += 1
    return cancelled
