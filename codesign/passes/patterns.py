"""Shared matchers: the graph shapes several passes rewrite, each recognised in one place.

A matcher takes a node (and the program, where it must read parameters) and returns the parts of the
pattern or None. Fusion, selective FP8 and request sharing all read these, so a model idiom one pass
learns to see, every pass sees.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from codesign.analysis import node_value
from codesign.ir.program import Program
from codesign.ops.grouped_embedding_bag import EMBEDDING_BAG_MODES
from codesign.passes.graph_edit import param_value

__all__ = ["UNARY_ACTIVATIONS", "embedding_bag_lookup", "epilogue_activation", "linear_parts"]

aten = torch.ops.aten

# Activations a fused GEMM epilogue computes (codesign::fused_linear, broadcast_linear, fp8_linear).
UNARY_ACTIVATIONS: dict[Any, str] = {
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
    aten.gelu.default: "gelu",
}


def epilogue_activation(node: torch.fx.Node) -> tuple[torch.fx.Node, str] | None:
    """(activation node, name) when ``node``'s only user is a fusable activation of ``node`` alone.

    GELU only in its exact (erf) form: the kernels' epilogues compute that one.
    """
    if len(node.users) != 1:
        return None
    (user,) = node.users
    name = UNARY_ACTIVATIONS.get(user.target)
    if name is None or user.args != (node,):
        return None
    if name == "gelu" and user.kwargs.get("approximate", "none") != "none":
        return None
    return user, name


def linear_parts(
    program: Program, node: torch.fx.Node
) -> tuple[Any, torch.Tensor, torch.Tensor | None] | None:
    """(input, weight, bias) of a Linear (or ``codesign::broadcast_linear``) whose weight and bias are parameters."""
    if node.target not in (aten.linear.default, torch.ops.codesign.broadcast_linear.default):
        return None
    x, w_node = node.args[0], node.args[1]
    b_node = node.args[2] if len(node.args) > 2 else None
    weight = param_value(program, w_node)
    bias = param_value(program, b_node) if b_node is not None else None
    if weight is None or weight.dim() != 2 or (b_node is not None and bias is None):
        return None
    if node_value(x) is None:
        return None
    return x, weight, bias


def embedding_bag_lookup(program: Program, node: torch.fx.Node) -> tuple[torch.Tensor, Any, Any, int] | None:
    """(table, ids node, offsets node, mode) of an EmbeddingBag lookup the grouped op can take."""
    if node.target not in (aten.embedding_bag.padding_idx, aten.embedding_bag.default):
        return None
    args = list(node.args) + [None] * 9
    weight, ids, offsets = param_value(program, args[0]), args[1], args[2]
    mode: Any = args[4] if args[4] is not None else 0
    per_sample, last_offset = args[6], bool(args[7])
    padding = args[8] if node.target is aten.embedding_bag.padding_idx else None
    if weight is None or weight.dim() != 2 or not isinstance(ids, torch.fx.Node):
        return None
    if not isinstance(offsets, torch.fx.Node) or per_sample is not None or last_offset:
        return None
    if padding not in (None, -1) or int(mode) not in EMBEDDING_BAG_MODES:
        return None
    # only the pooled output (getitem 0) may be used: the others are autograd bookkeeping
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
        return None
    ids_val, offsets_val = node_value(ids), node_value(offsets)
    if ids_val is None or ids_val.dim() != 1 or offsets_val is None or offsets_val.dim() != 1:
        return None
    return weight, ids, offsets, int(mode)
