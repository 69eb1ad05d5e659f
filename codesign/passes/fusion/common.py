"""What the fusion passes share: their tolerance and the graph helpers for grouping and replacing nodes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from codesign.analysis import count_kernels
from codesign.ir.program import Program
from codesign.numerics import Tolerance
from codesign.passes.graph_edit import insert_call

__all__ = ["REORDERED", "ancestors", "independent_groups", "kernels_stats", "latest", "replace_with_slices"]

aten = torch.ops.aten

# A fused GEMM sums the same products in another blocking order: fp32 results move by a few ulps.
REORDERED = Tolerance(rtol=1e-4, atol=1e-5)


def latest(graph: torch.fx.Graph, nodes: Sequence[Any]) -> torch.fx.Node:
    """The node of ``nodes`` that comes last in the graph (a fused node must follow all its inputs)."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    last: torch.fx.Node = max(nodes, key=position.__getitem__)
    return last


def ancestors(graph: torch.fx.Graph) -> tuple[dict[torch.fx.Node, int], dict[torch.fx.Node, int]]:
    """(bit of each node, bitmask of its ancestors): independence checks in O(1) per pair."""
    bit: dict[torch.fx.Node, int] = {}
    anc: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(graph.nodes):
        bit[node] = 1 << i
        mask = 0
        for a in node.all_input_nodes:
            mask |= anc[a] | bit[a]
        anc[node] = mask
    return bit, anc


def independent_groups(
    nodes: Sequence[torch.fx.Node],
    graph: torch.fx.Graph,
    accept: Callable[[list[torch.fx.Node], torch.fx.Node], bool],
) -> list[list[torch.fx.Node]]:
    """Greedy partition of ``nodes`` (graph order) into groups where no member depends on another."""
    bit, anc = ancestors(graph)
    groups: list[list[torch.fx.Node]] = []
    for node in nodes:
        for group in groups:
            if accept(group, node) and all(
                not (anc[node] & bit[m]) and not (anc[m] & bit[node]) for m in group
            ):
                group.append(node)
                break
        else:
            groups.append([node])
    return groups


def kernels_stats(before: int, program: Program, **extra: Any) -> dict[str, Any]:
    return {"kernels_before": before, "kernels_after": count_kernels(program), **extra}


def replace_with_slices(
    graph: torch.fx.Graph, members: Sequence[torch.fx.Node], values: Sequence[torch.fx.Node]
) -> None:
    """Point every user of ``members[i]`` at ``values[i]`` (a slice of the fused result).

    A slice along the last dim is strided; ``aten.view`` users need contiguous memory, so they get a
    contiguous copy (the other users keep the free view).
    """
    for member, value in zip(members, values, strict=True):
        viewers = [u for u in member.users if u.target is aten.view.default]
        if viewers:
            with graph.inserting_after(value):
                dense = insert_call(
                    graph, aten.clone.default, (value,), {"memory_format": torch.contiguous_format}
                )
            for u in viewers:
                u.replace_input_with(member, dense)
        member.replace_all_uses_with(value)
        graph.erase_node(member)
