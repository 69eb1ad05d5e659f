"""Roles of graph values: ``request`` (identical on every row of a request), ``candidate`` (varies
per candidate) or ``param`` (no row dimension at all).

Roles start from the RequestSpec (request-level inputs and request-level column ranges) and flow
through the graph. The rules are conservative: an op not known to keep rows independent makes its
output candidate-level, so request sharing never computes a value once that differs per row.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Iterable

import torch
import torch.fx

from codesign.analysis.graph_queries import VIEW_OPS, as_int, node_value
from codesign.analysis.shapes import symbolic_dim
from codesign.ir.program import REQUEST_OFFSETS, Program

__all__ = ["Role", "is_row_view", "propagate_roles"]

aten = torch.ops.aten


class Role(str, enum.Enum):
    REQUEST = "request"
    CANDIDATE = "candidate"
    PARAM = "param"


# Ops that act on each row independently as long as their dim argument is not 0 (position of dim).
_DIM_ARG = {
    aten.sum.dim_IntList: 1,
    aten.mean.dim: 1,
    aten.amax.default: 1,
    aten.amin.default: 1,
    aten.softmax.int: 1,
    aten._softmax.default: 1,
    aten.log_softmax.int: 1,
    aten.cat.default: 1,
    aten.stack.default: 1,
    aten.select.int: 1,
    aten.slice.Tensor: 1,
    aten.split.Tensor: 2,
    aten.chunk.default: 2,
    aten.unbind.int: 1,
    aten.split_with_sizes.default: 2,
    aten.transpose.int: 1,
    aten.squeeze.dim: 1,
    aten.unsqueeze.default: 1,
    aten.unflatten.int: 1,
    aten.flatten.using_ints: 1,
    aten.cumsum.default: 1,
    aten.narrow.default: 1,
    aten.index_select.default: 1,
    aten.gather.default: 1,
    aten.max.dim: 1,
    aten.min.dim: 1,
}
_ELEMENTWISE_OR_ROWWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.relu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.gelu.default,
    aten.prelu.default,
    aten.where.self,
    aten.pow.Tensor_Scalar,
    aten.exp.default,
    aten.log.default,
    aten.neg.default,
    aten.rsqrt.default,
    aten.clamp.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.dropout.default,
    aten.masked_fill.Scalar,
    aten.eq.Scalar,
    aten.gt.Scalar,
    aten.lt.Scalar,
    aten.ne.Scalar,
    aten.ge.Scalar,
    aten.abs.default,
    aten.log1p.default,
    aten.layer_norm.default,
    aten.linear.default,
    aten.bmm.default,
    aten.matmul.default,
    aten.baddbmm.default,
    aten.scaled_dot_product_attention.default,
    aten.silu.default,
    aten.embedding.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.add.Scalar,
    aten.mul.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.expand_as.default,
    aten.alias.default,
    aten.detach.default,
    aten.squeeze.default,
    aten.t.default,
    aten._assert_tensor_metadata.default,
    operator.getitem,
}
_EMBEDDING_BAGS = (aten.embedding_bag.padding_idx, aten.embedding_bag.default)
# Views that do not return one tensor with rows (sizes, checks, several pieces): never row views.
_NOT_ROW_VIEWS = {
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten._assert_tensor_metadata.default,
    aten.split.Tensor,
    aten.chunk.default,
    aten.unbind.int,
    aten.split_with_sizes.default,
    operator.getitem,
}


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _arg_node(node: torch.fx.Node, index: int) -> torch.fx.Node | None:
    arg = node.args[index] if index < len(node.args) else None
    return arg if isinstance(arg, torch.fx.Node) else None


def _keeps_rows(node: torch.fx.Node) -> bool:
    """True when output row i depends only on input rows i (dim 0 untouched)."""
    t = node.target
    args = list(node.args)
    if t in _DIM_ARG:
        pos = _DIM_ARG[t]
        dim = args[pos] if len(args) > pos else node.kwargs.get("dim", 0)
        first = args[0]
        if isinstance(first, list | tuple):
            first = first[0]
        val = node_value(first)
        rank = val.dim() if val is not None else 1
        if t is aten.transpose.int:
            return 0 not in (_norm_dim(as_int(args[1]), rank), _norm_dim(as_int(args[2]), rank))
        if t is aten.unsqueeze.default:
            rank += 1
        if isinstance(dim, list | tuple):
            return all(_norm_dim(as_int(d), rank) != 0 for d in dim)
        return _norm_dim(as_int(dim), rank) != 0
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        src, out = node_value(args[0]), node_value(node)
        return (
            src is not None
            and out is not None
            and src.dim() > 0
            and out.dim() > 0
            and symbolic_dim(src.shape[0]) == symbolic_dim(out.shape[0])
        )
    if t is aten.permute.default:
        dims = args[1]
        return isinstance(dims, list | tuple) and as_int(dims[0]) == 0
    if t is aten.index.Tensor:
        indices = args[1]
        return isinstance(indices, list | tuple) and bool(indices) and indices[0] is None
    if t in (aten.mm.default, aten.addmm.default):
        b = args[-1]
        return isinstance(b, torch.fx.Node) and b.op == "get_attr"
    return t in _ELEMENTWISE_OR_ROWWISE or t in _EMBEDDING_BAGS


def is_row_view(node: torch.fx.Node) -> bool:
    """A view op that leaves dim 0 (the candidate rows) alone: applying it before or after a row gather agrees."""
    if node.op != "call_function" or node.target not in VIEW_OPS or node.target in _NOT_ROW_VIEWS:
        return False
    return _keeps_rows(node)


def propagate_roles(program: Program) -> dict[str, Role]:
    """Role of every node from the RequestSpec (request-level inputs or column ranges)."""
    spec = program.spec
    roles: dict[str, Role] = {}
    request_cols: dict[str, tuple[tuple[int, int], ...]] = {}
    for path, node in program.placeholders().items():
        if path == REQUEST_OFFSETS:
            roles[node.name] = Role.PARAM
        elif path in spec.static_inputs or path in spec.jagged.values():
            roles[node.name] = Role.PARAM if path in spec.static_inputs else Role.CANDIDATE
        elif path in spec.request_inputs:
            roles[node.name] = Role.REQUEST
        else:
            roles[node.name] = Role.CANDIDATE
            if path in spec.request_columns:
                request_cols[node.name] = spec.request_columns[path]
    for node in program.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op in ("get_attr", "output") or node.op == "call_module":
            roles[node.name] = Role.PARAM if node.op == "get_attr" else Role.CANDIDATE
            continue
        ins = [roles.get(a.name, Role.CANDIDATE) for a in node.all_input_nodes]
        source = _arg_node(node, 0)
        if node.target is aten.sym_size.int and len(node.args) > 1 and node.args[1] != 0:
            roles[node.name] = Role.PARAM  # a size other than the row count is the same for every row
        elif (
            node.target in (aten.slice.Tensor, aten.select.int)
            and source is not None
            and source.name in request_cols
        ):
            roles[node.name] = _column_role(node, request_cols[source.name])
        elif node.target in _EMBEDDING_BAGS:
            # rows of the output are bags: request-level when the bag ids are request-level
            ids = _arg_node(node, 1)
            request_ids = ids is not None and roles.get(ids.name) is Role.REQUEST
            roles[node.name] = Role.REQUEST if request_ids else Role.CANDIDATE
        elif all(r is Role.PARAM for r in ins):
            roles[node.name] = Role.PARAM
        elif Role.CANDIDATE in ins or not _keeps_rows(node):
            roles[node.name] = Role.CANDIDATE
        else:
            roles[node.name] = Role.REQUEST
    return roles


def _column_role(node: torch.fx.Node, ranges: Iterable[tuple[int, int]]) -> Role:
    """Request-level when the slice or select of dim 1 stays inside one request-level column range."""
    args = list(node.args)
    dim = as_int(args[1]) if len(args) > 1 else 0
    if dim != 1:
        return Role.CANDIDATE
    if node.target is aten.select.int:
        lo, hi = as_int(args[2]), as_int(args[2]) + 1
    else:
        lo = as_int(args[2]) if len(args) > 2 and args[2] is not None else 0
        out = node_value(node)
        if out is None:
            return Role.CANDIDATE
        hi = lo + int(out.shape[1])
    return Role.REQUEST if any(a <= lo and hi <= b for a, b in ranges) else Role.CANDIDATE
