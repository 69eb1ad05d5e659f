"""``codesign::grouped_embedding_bag``: many EmbeddingBag lookups as one (the TBE idea).

Ranking models look up tens to hundreds of tables per request, each a separate small kernel. The
fusion pass concatenates tables of equal width and dtype into one weight and rewrites their
lookups to this op:

    out = grouped_embedding_bag(weight, [idx_0, ..., idx_T-1], [off_0, ...], table_starts, mode)

``table_starts`` has T+1 entries: table t owns rows ``table_starts[t]:table_starts[t+1]`` of
``weight``. The output stacks every table's bags, table by table: rows ``sum(B_<t):sum(B_<=t)``
are table t's ``embedding_bag(idx_t, off_t)``. Indices are checked against their own table (a
bad id raises like ``nn.EmbeddingBag`` does rather than reading a neighbouring table). The CPU
path runs one ``embedding_bag`` over shifted ids; CUDA runs a Triton gather-reduce kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from codesign.analysis.costs import OpCost, register_cost
from codesign.analysis.graph_queries import tensor_arg
from codesign.analysis.shapes import ConcreteShapes
from codesign.ops.embedding_bags import EMBEDDING_BAG_MODES, flatten_groups

__all__ = [
    "EMBEDDING_BAG_MODES",
    "GROUPED_ID_PASSES",
    "flatten_groups",
    "grouped_embedding_bag",
    "grouped_embedding_bag_reference",
]

# Passes over ids/offsets the lookup makes before its gather (``flatten_groups``: concatenate, shift
# into the joint table, bounds-check per table), charged as reads/writes of every id and offset.
GROUPED_ID_PASSES = 10


def grouped_embedding_bag_reference(
    weight: torch.Tensor,
    indices: Sequence[torch.Tensor],
    offsets: Sequence[torch.Tensor],
    table_starts: Sequence[int],
    mode: int,
) -> torch.Tensor:
    """Reference semantics (also the CPU implementation): one ``embedding_bag`` over shifted ids."""
    if mode not in EMBEDDING_BAG_MODES:
        raise ValueError(f"grouped_embedding_bag: mode {mode} is not one of {EMBEDDING_BAG_MODES}")
    ids, bag_offsets = flatten_groups(indices, offsets, table_starts)
    out, *_ = torch.ops.aten._embedding_bag_forward_only(
        weight, ids, bag_offsets, False, mode, False, None, True
    )
    return out


@torch.library.custom_op("codesign::grouped_embedding_bag", mutates_args=())
def grouped_embedding_bag(
    weight: torch.Tensor,
    indices: list[torch.Tensor],
    offsets: list[torch.Tensor],
    table_starts: list[int],
    mode: int,
) -> torch.Tensor:
    if weight.is_cuda:
        from codesign.ops.grouped_embedding_bag_triton import grouped_embedding_bag_triton

        return grouped_embedding_bag_triton(weight, indices, offsets, table_starts, mode)
    return grouped_embedding_bag_reference(weight, indices, offsets, table_starts, mode)


@grouped_embedding_bag.register_fake
def _(
    weight: torch.Tensor,
    indices: list[torch.Tensor],
    offsets: list[torch.Tensor],
    table_starts: list[int],
    mode: int,
) -> torch.Tensor:
    bags = sum(o.shape[0] for o in offsets)
    return weight.new_empty((bags, weight.shape[1]))


@register_cost(torch.ops.codesign.grouped_embedding_bag.default)
def _cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """One FLOP per looked-up value; the id preparation, the gathered rows and the bags in bytes."""
    weight = tensor_arg(node, 0)
    looked_up = shapes.total_numel(node.args[1]) * shapes.dim(weight.shape[-1])
    meta = shapes.total_bytes(list(node.args[1:3]))
    prep = GROUPED_ID_PASSES * meta
    return OpCost(looked_up, prep + looked_up * weight.dtype.itemsize + shapes.total_bytes(node))
