"""Analysis: roles of tensors (request or candidate level), per-node costs and graph queries over a Program."""

from __future__ import annotations

from codesign.analysis.graph import (
    FLOPS_PER_ELEMENT,
    NodeCost,
    ProgramAnalysis,
    Role,
    analyze,
    count_kernels,
    embedding_id_bounds,
    is_row_view,
    propagate_roles,
    symbolic_dim,
    to_networkx,
)

__all__ = [
    "FLOPS_PER_ELEMENT",
    "NodeCost",
    "ProgramAnalysis",
    "Role",
    "analyze",
    "count_kernels",
    "embedding_id_bounds",
    "is_row_view",
    "propagate_roles",
    "symbolic_dim",
    "to_networkx",
]
