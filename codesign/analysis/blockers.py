"""Why user work stays per candidate: the nodes where request-level roles stop, and what they cost.

A *blocker* is a candidate-level node all of whose inputs are request-level or parameters: nothing
per-candidate flows into it, yet the role rules cannot call it request-level (an op not known to
keep rows independent, a reshape that moves the row dimension, a stack along dim 0). Everything
downstream that is candidate-level only because of that blocker would be shared if the blocker
were, so each blocker is charged the FLOPs of the nodes whose candidate-ness traces back to it
alone: the share of the model's work a user can win by changing that one spot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx

from codesign.analysis.graph_queries import node_value, op_name
from codesign.analysis.program_analysis import ProgramAnalysis
from codesign.analysis.roles import Role, propagate_roles
from codesign.ir.program import Program

__all__ = ["Blocker", "find_blockers"]

aten = torch.ops.aten
_INPUT = "<candidate inputs>"


@dataclasses.dataclass(frozen=True)
class Blocker:
    """One node where request-level work becomes per-candidate, and what that costs."""

    node: str
    op: str
    why: str
    flops_share: (
        float  # of the program's FLOPs: this node and the work downstream only it makes per-candidate
    )
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.node} ({self.op}) {self.why}; it keeps {self.flops_share:.1%} of the FLOPs per candidate: {self.fix}"


def find_blockers(program: Program, analysis: ProgramAnalysis, limit: int = 3) -> list[Blocker]:
    """The blockers of ``program`` charged with their FLOPs in ``analysis``, largest first (at most ``limit``)."""
    roles = propagate_roles(program)
    flops = {n.name: n.flops for n in analysis.nodes}
    total = max(1, analysis.total_flops)
    origins: dict[str, frozenset[str]] = {}
    blockers: list[torch.fx.Node] = []
    for node in program.graph.nodes:
        if roles.get(node.name) is not Role.CANDIDATE or node.op in ("output", "get_attr"):
            continue
        cand_inputs = [a for a in node.all_input_nodes if roles.get(a.name) is Role.CANDIDATE]
        if node.op == "placeholder" or node.op == "call_module":
            origins[node.name] = frozenset({_INPUT})
        elif not cand_inputs:
            # a size (sym_size of dim 0) is no work stopped: only tensors can block
            has_request = node_value(node) is not None and any(
                roles.get(a.name) is Role.REQUEST for a in node.all_input_nodes
            )
            origins[node.name] = frozenset({node.name}) if has_request else frozenset({_INPUT})
            if has_request:
                blockers.append(node)
        else:
            origins[node.name] = frozenset().union(
                *(origins.get(a.name, frozenset({_INPUT})) for a in cand_inputs)
            )
    charged: dict[str, int] = {}
    for name, origin in origins.items():
        if len(origin) == 1 and _INPUT not in origin:
            (blocker,) = origin
            charged[blocker] = charged.get(blocker, 0) + flops.get(name, 0)
    found = [_describe(node, charged.get(node.name, 0) / total) for node in blockers]
    found.sort(key=lambda b: -b.flops_share)
    return found[:limit]


def _describe(node: torch.fx.Node, share: float) -> Blocker:
    """Why the role rules stop at ``node`` and what a user can do about it."""
    op = op_name(node)
    t = node.target
    dim_zero = "moves or mixes dim 0, the candidate rows"
    if t in (aten.stack.default, aten.cat.default):
        why = f"{op} along dim 0 {dim_zero}"
        fix = (
            "stack/concatenate along dim 1 or later (e.g. heads as dim 1), so dim 0 stays the candidate rows"
        )
    elif t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints):
        why = f"{op} {dim_zero} (its output's dim 0 is not the candidate count)"
        fix = "keep the candidate count as dim 0 in view/reshape (e.g. x.view(x.shape[0], -1, d))"
    elif t in (aten.transpose.int, aten.permute.default, aten.t.default):
        why = f"{op} {dim_zero}"
        fix = "transpose/permute only dims >= 1 (use batch-first layouts)"
    elif t in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.sum.default):
        why = f"{op} reduces over dim 0, the candidate rows"
        fix = "reduce over feature dims only"
    else:
        why = f"{op} is not known to keep rows independent"
        fix = (
            "if each output row depends only on the same input row, add the op to the row rules "
            "(codesign.analysis.roles); else compute it on candidate inputs"
        )
    return Blocker(node.name, op, why, share, fix)
