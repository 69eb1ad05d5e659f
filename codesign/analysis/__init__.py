"""Analysis: roles of tensors (request or candidate level), per-node costs and graph queries over a Program.

Modules, one job each: ``graph_queries`` (what a node holds, views, kernel counts, id bounds),
``shapes`` (symbolic sizes bound to a batch), ``costs`` (the op-cost registry), ``roles``
(request/candidate/param propagation), ``program_analysis`` (``analyze``), ``networkx_view``.
"""

from __future__ import annotations

from codesign.analysis.costs import (
    FLOPS_PER_ELEMENT,
    CostFn,
    Engine,
    OpCost,
    cost_of,
    default_cost,
    gemm_flops,
    io_bytes,
    linear_cost,
    linear_flops,
    register_cost,
    registered_cost,
)
from codesign.analysis.graph_queries import (
    VIEW_OPS,
    count_kernels,
    embedding_id_bounds,
    node_value,
    tensor_arg,
    tensor_values,
)
from codesign.analysis.networkx_view import to_networkx
from codesign.analysis.program_analysis import NodeCost, ProgramAnalysis, analyze
from codesign.analysis.roles import Role, is_row_view, propagate_roles
from codesign.analysis.shapes import ConcreteShapes, symbolic_dim

__all__ = [
    "FLOPS_PER_ELEMENT",
    "VIEW_OPS",
    "ConcreteShapes",
    "CostFn",
    "Engine",
    "NodeCost",
    "OpCost",
    "ProgramAnalysis",
    "Role",
    "analyze",
    "cost_of",
    "count_kernels",
    "default_cost",
    "embedding_id_bounds",
    "gemm_flops",
    "io_bytes",
    "is_row_view",
    "linear_cost",
    "linear_flops",
    "node_value",
    "propagate_roles",
    "register_cost",
    "registered_cost",
    "symbolic_dim",
    "tensor_arg",
    "tensor_values",
    "to_networkx",
]
