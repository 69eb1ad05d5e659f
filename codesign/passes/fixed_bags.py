"""Fixed-size bags of request-level ids as row-wise lookups, so request sharing can compute them once.

``nn.EmbeddingBag`` called on a 2-D id tensor ``x [N, F]`` (F ids per bag) exports as
``embedding_bag(W, x.reshape(-1), arange(0, x.numel(), F))``: the flat ids have N*F rows, so the row
rules cannot tell that bag i reads only row i of ``x``, and user profile tables stay per candidate.
Where ``x`` is request-level this rewrite states the same lookup row by row, ``embedding(W, x)``
reduced over dim 1 (sum or mean, padding ids masked out as EmbeddingBag does), which the row rules
follow; request sharing then runs it on one row per request.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from codesign.analysis.graph_queries import node_value
from codesign.analysis.roles import Role, propagate_roles
from codesign.ir.program import Program
from codesign.passes.graph_edit import insert_call

__all__ = ["rewrite_fixed_bags"]

aten = torch.ops.aten
_BAGS = (aten.embedding_bag.padding_idx, aten.embedding_bag.default)
_SUM, _MEAN = 0, 1


def rewrite_fixed_bags(program: Program) -> int:
    """Rewrite every fixed-size bag lookup over request-level ids in place; returns how many."""
    roles = propagate_roles(program)
    graph = program.graph
    done = 0
    for node in list(graph.nodes):
        ids = _fixed_bag_ids(node)
        if ids is None or roles.get(ids.name) is not Role.REQUEST:
            continue
        args = list(node.args) + [None] * (9 - len(node.args))
        weight, mode, per_sample, padding = args[0], args[4] or 0, args[6], args[8]
        if per_sample is not None or mode not in (_SUM, _MEAN) or args[7]:
            continue
        outputs = [u for u in node.users if u.target is operator.getitem]
        if len(outputs) != len(node.users) or any(u.args[1] != 0 and u.users for u in outputs):
            continue  # only the pooled output may be read
        with graph.inserting_before(node):
            rows = insert_call(graph, aten.embedding.default, (weight, ids))  # [N, F, d]
            count = None
            if isinstance(padding, int) and padding >= 0:
                keep = insert_call(graph, aten.ne.Scalar, (ids, padding))
                keep = insert_call(graph, aten.unsqueeze.default, (keep, -1))
                keep = insert_call(graph, aten._to_copy.default, (keep,), {"dtype": rows.meta["val"].dtype})
                rows = insert_call(graph, aten.mul.Tensor, (rows, keep))
                count = insert_call(graph, aten.sum.dim_IntList, (keep, [1]))
            pooled = insert_call(graph, aten.sum.dim_IntList, (rows, [1]))
            if mode == _MEAN:
                if count is None:
                    pooled = insert_call(graph, aten.div.Scalar, (pooled, int(node_value(ids).shape[1])))  # type: ignore[union-attr]
                else:
                    count = insert_call(graph, aten.clamp.default, (count, 1))
                    pooled = insert_call(graph, aten.div.Tensor, (pooled, count))
        for out in outputs:
            if out.args[1] == 0:
                out.replace_all_uses_with(pooled)
            graph.erase_node(out)
        graph.erase_node(node)
        done += 1
    if done:
        graph.eliminate_dead_code()
    return done


def _fixed_bag_ids(node: torch.fx.Node) -> torch.fx.Node | None:
    """The 2-D ids ``x`` of ``embedding_bag(W, x.reshape(-1), arange(0, x.numel(), x.shape[1]))``, else None."""
    if node.target not in _BAGS or len(node.args) < 3:
        return None
    flat, offsets = node.args[1], node.args[2]
    if not (isinstance(flat, torch.fx.Node) and isinstance(offsets, torch.fx.Node)):
        return None
    if flat.target not in (aten.reshape.default, aten.view.default) or list(flat.args[1]) != [-1]:  # type: ignore[arg-type]
        return None
    ids = flat.args[0]
    val = node_value(ids)
    if (
        not isinstance(ids, torch.fx.Node)
        or val is None
        or val.dim() != 2
        or not isinstance(val.shape[1], int)
    ):
        return None
    if offsets.target is not aten.arange.start_step or len(offsets.args) < 3:
        return None
    start, end, step = offsets.args[:3]
    numel = end if isinstance(end, torch.fx.Node) else None
    counts_ids = numel is not None and numel.target is aten.sym_numel.default and numel.args[0] is ids
    return ids if start == 0 and step == val.shape[1] and counts_ids else None
