"""A networkx view of a Program's graph, for graph algorithms and drawing outside codesign.

networkx is imported only when a view is built, so importing ``codesign.analysis`` does not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codesign.analysis.graph_queries import op_name
from codesign.analysis.program_analysis import ProgramAnalysis
from codesign.analysis.roles import Role, propagate_roles
from codesign.ir.program import Program

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["to_networkx"]


def to_networkx(program: Program, analysis: ProgramAnalysis | None = None) -> nx.DiGraph:
    """The graph as a networkx DiGraph (node attributes: op, role and, with an analysis, costs).

    >>> g = to_networkx(program, analyze(program, 64))
    """
    import networkx as nx

    costs = {n.name: n for n in analysis.nodes} if analysis else {}
    roles = propagate_roles(program)
    g = nx.DiGraph()
    for node in program.graph.nodes:
        attrs: dict[str, Any] = {
            "op": node.op,
            "target": op_name(node) if node.op == "call_function" else str(node.target),
            "role": roles.get(node.name, Role.CANDIDATE).value,
        }
        if node.name in costs:
            c = costs[node.name]
            attrs.update(flops=c.flops, bytes=c.bytes, param_bytes=c.param_bytes, is_view=c.is_view)
        g.add_node(node.name, **attrs)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g
