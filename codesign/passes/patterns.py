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

from codesign.analysis import node_value, symbolic_dim
from codesign.ir.program import Program
from codesign.ops.grouped_embedding_bag import EMBEDDING_BAG_MODES
from codesign.passes.graph_edit import insert_call, param_value

__all__ = [
    "UNARY_ACTIVATIONS",
    "embedding_as_bag",
    "embedding_bag_lookup",
    "embedding_lookup",
    "epilogue_activation",
    "linear_parts",
]

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


def embedding_lookup(program: Program, node: torch.fx.Node) -> tuple[torch.Tensor, torch.fx.Node] | None:
    """(table, ids node) of an ``nn.Embedding`` lookup (``aten.embedding``) of a 2-D parameter table.

    ``padding_idx`` only affects gradients, so every inference lookup qualifies; the ids may have any
    shape (``[N]``, ``[N, L]``).
    """
    if node.target is not aten.embedding.default or len(node.args) < 2:
        return None
    weight, ids = param_value(program, node.args[0]), node.args[1]
    if weight is None or weight.dim() != 2 or not isinstance(ids, torch.fx.Node):
        return None
    ids_val = node_value(ids)
    if ids_val is None or ids_val.is_floating_point() or ids_val.dim() < 1:
        return None
    return weight, ids


def embedding_as_bag(
    program: Program, node: torch.fx.Node, shared_offsets: dict[Any, torch.fx.Node] | None = None
) -> torch.fx.Node:
    """Rewrite an ``nn.Embedding`` lookup (``embedding_lookup``) in place as an EmbeddingBag of one id per bag.

    ``embedding(W, ids)`` equals ``embedding_bag(W, ids.flatten(), arange(ids.numel()), mode=sum)``
    reshaped to ``[*ids.shape, d]``: what lets the passes that group and shard EmbeddingBag tables take
    ``nn.Embedding`` tables too. Returns the new ``embedding_bag`` node (its pooled output is getitem 0).
    ``shared_offsets`` (size expression -> ``arange`` node) lets lookups of as many ids share one
    ``arange``: the node must already stand before ``node`` in the graph.
    """
    graph = program.graph
    weight_node, ids = node.args[0], node.args[1]
    assert isinstance(ids, torch.fx.Node)
    ids_val = node_value(ids)
    assert ids_val is not None
    with graph.inserting_before(node):
        flat = ids if ids_val.dim() == 1 else insert_call(graph, aten.reshape.default, (ids, [-1]))
        size = symbolic_dim(ids_val.numel()), ids_val.dtype
        offsets = (shared_offsets or {}).get(size)
        if offsets is None:
            count = insert_call(graph, aten.sym_size.int, (flat, 0))
            offsets = insert_call(
                graph, aten.arange.default, (count,), {"dtype": ids_val.dtype, "device": ids_val.device}
            )
            if shared_offsets is not None:
                shared_offsets[size] = offsets
        bag = insert_call(graph, aten.embedding_bag.default, (weight_node, flat, offsets, False, 0))
        pooled = insert_call(graph, operator.getitem, (bag, 0))
        out = pooled
        if ids_val.dim() > 1:
            sizes = [insert_call(graph, aten.sym_size.int, (ids, k)) for k in range(ids_val.dim())]
            table = param_value(program, weight_node)
            assert table is not None
            width = int(table.shape[1])
            out = insert_call(graph, aten.reshape.default, (pooled, [*sizes, width]))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return bag
