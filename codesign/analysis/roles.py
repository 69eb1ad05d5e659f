"""Roles of graph values: ``request`` (identical on every row of a request), ``candidate`` (varies
per candidate) or ``param`` (no row dimension at all).

Roles start from the RequestSpec (request-level inputs and request-level column ranges) and flow
through the graph. The rules are conservative: an op not known to keep rows independent makes its
output candidate-level, so request sharing never computes a value once that differs per row.
"""

from __future__ import annotations

import enum
import operator
from typing import Any

import torch
import torch.fx

from codesign.analysis.graph_queries import VIEW_OPS, as_int, constant_value, node_value
from codesign.analysis.shapes import static_size, symbolic_dim
from codesign.ir.program import REQUEST_OFFSETS, Program

__all__ = [
    "Role",
    "column_positions",
    "infer_role",
    "is_row_view",
    "propagate_roles",
    "request_column_inputs",
]

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
    aten.conv1d.default,  # dim 0 is the batch of a convolution: one row in, one row out
    aten.conv2d.default,
    aten._native_batch_norm_legit_no_training.default,  # inference batch norm: running statistics
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
    if t is aten.einsum.default:
        return _einsum_keeps_rows(node)
    if t is aten.tensordot.default:  # x . W over non-row dims of x: one row in, one row out
        b, dims = args[1], args[2]
        first_val = node_value(args[0])
        rank = first_val.dim() if first_val is not None else 1
        return (
            isinstance(b, torch.fx.Node)
            and b.op == "get_attr"
            and isinstance(dims, list | tuple)
            and all(_norm_dim(as_int(d), rank) != 0 for d in dims)
        )
    return t in _ELEMENTWISE_OR_ROWWISE or t in _EMBEDDING_BAGS


def slice_positions(args: list[Any], size: int) -> list[int] | None:
    """Positions ``aten.slice.Tensor(x, dim, start, end, step)`` (its ``args``) keeps of a dim of ``size``."""
    bounds = [args[i] if len(args) > i and args[i] is not None else d for i, d in ((2, 0), (3, size), (4, 1))]
    if not all(isinstance(v, int) for v in bounds):
        return None
    start, end, step = (int(v) for v in bounds)
    return list(range(size))[slice(start, end, step)]


def _einsum_keeps_rows(node: torch.fx.Node) -> bool:
    """``einsum`` whose operands with rows all index them with the output's first letter (and the others
    do not use that letter): each output row reads only the same row of each operand."""
    equation, operands, out = node.args[0], node.args[1], node_value(node)
    if (
        not isinstance(equation, str)
        or "->" not in equation
        or "." in equation
        or out is None
        or out.dim() == 0
    ):
        return False
    ins, result = equation.replace(" ", "").split("->")
    letters = ins.split(",")
    if not result or not isinstance(operands, list | tuple) or len(letters) != len(operands):
        return False
    rows, letter = symbolic_dim(out.shape[0]), result[0]
    for spec, op in zip(letters, operands, strict=True):
        val = node_value(op)
        if val is None or val.dim() == 0:
            continue
        has_rows = symbolic_dim(val.shape[0]) == rows
        if has_rows != (spec[:1] == letter) or (not has_rows and letter in spec):
            return False
    return True


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
        elif path in spec.static_inputs or path in spec.not_sliced:
            roles[node.name] = Role.PARAM if path in spec.static_inputs else Role.CANDIDATE
        elif path in spec.request_inputs:
            roles[node.name] = Role.REQUEST
        else:
            roles[node.name] = Role.CANDIDATE
            if path in spec.request_columns:
                request_cols[node.name] = spec.request_columns[path]
    for node in program.graph.nodes:
        if node.op != "placeholder":
            roles[node.name] = infer_role(program, node, roles, request_cols)
    return roles


def infer_role(
    program: Program,
    node: torch.fx.Node,
    roles: dict[str, Role],
    request_cols: dict[str, tuple[tuple[int, int], ...]],
) -> Role:
    """The role of one (non-placeholder) node from its inputs' roles (one step of ``propagate_roles``).

    ``request_cols`` maps the names of flat feature tensors to their request-level column ranges; a
    whole-rows view of one (``x[:]``) is added to it. Rewrites that change a node's inputs call this
    to keep roles current without propagating over the whole graph again.
    """
    if node.op in ("get_attr", "output") or node.op == "call_module":
        return Role.PARAM if node.op == "get_attr" else Role.CANDIDATE
    ins = [roles.get(a.name, Role.CANDIDATE) for a in node.all_input_nodes]
    source = _arg_node(node, 0)
    ranges = request_cols.get(source.name) if source is not None else None
    if node.target is aten.sym_size.int and len(node.args) > 1 and node.args[1] != 0:
        return Role.PARAM  # a size other than the row count is the same for every row
    if ranges is not None and _is_whole_rows(node):
        request_cols[node.name] = ranges  # x[:] / x.clone(): the same columns
        return Role.CANDIDATE
    if ranges is not None and node.target in _COLUMN_PICKS:
        cols = column_positions(program, node)
        request = cols is not None and all(any(a <= c < b for a, b in ranges) for c in cols)
        return Role.REQUEST if request else Role.CANDIDATE
    if node.target in _EMBEDDING_BAGS:
        # rows of the output are bags: request-level when the bag ids are request-level
        ids = _arg_node(node, 1)
        return Role.REQUEST if ids is not None and roles.get(ids.name) is Role.REQUEST else Role.CANDIDATE
    if all(r is Role.PARAM for r in ins):
        return Role.PARAM
    if Role.CANDIDATE in ins or not (_keeps_rows(node) or _product_with_param(node, roles)):
        return Role.CANDIDATE
    return Role.REQUEST


def _product_with_param(node: torch.fx.Node, roles: dict[str, Role]) -> bool:
    """``mm``/``addmm``/``tensordot`` of rows by a parameter-derived matrix (a sliced or transposed weight)."""
    if node.target not in (aten.mm.default, aten.addmm.default, aten.tensordot.default):
        return False
    weight = node.args[-1] if node.target is not aten.tensordot.default else node.args[1]
    if node.target is aten.tensordot.default:
        dims, first = node.args[2], node_value(node.args[0])
        if (
            not isinstance(dims, list | tuple)
            or first is None
            or 0 in [_norm_dim(as_int(d), first.dim()) for d in dims]
        ):
            return False
    return isinstance(weight, torch.fx.Node) and roles.get(weight.name) is Role.PARAM


def request_column_inputs(program: Program) -> dict[str, tuple[tuple[int, int], ...]]:
    """Names of the placeholders with request-level column ranges, and the ranges."""
    spec = program.spec
    return {
        node.name: spec.request_columns[path]
        for path, node in program.placeholders().items()
        if path in spec.request_columns and path not in spec.request_inputs
    }


# Ops that pick columns (dim 1) of a 2-D feature tensor: x[:, a:b], x[:, i], x[:, [i, j]].
_COLUMN_PICKS = frozenset(
    {aten.slice.Tensor, aten.select.int, aten.index_select.default, aten.index.Tensor, aten.narrow.default}
)


def _is_whole_rows(node: torch.fx.Node) -> bool:
    """``x[:]`` (a full slice of dim 0) or a copy: every row and every column, unchanged."""
    if node.target in (aten.clone.default, aten.alias.default, aten.contiguous.default):
        return True
    if node.target is not aten.slice.Tensor:
        return False
    args = list(node.args) + [None] * 5
    start, end, step = args[2] or 0, args[3], args[4] or 1
    whole_end = end is None or (isinstance(end, int) and end >= 2**62)
    return bool(as_int(args[1] or 0) == 0 and start == 0 and step == 1 and whole_end)


def column_positions(program: Program, node: torch.fx.Node) -> list[int] | None:
    """The columns (dim 1 positions of the input) a column pick reads, in output order; None if unknown.

    Covers the ways a model picks fields from one flat feature tensor: slices, selects, index lists
    (``x[:, [0, 3, 5]]``, exported as ``index.Tensor`` over a lifted constant) and ``index_select``.
    """
    src = node_value(node.args[0])
    width = static_size(src.shape[1]) if src is not None and src.dim() >= 2 else None
    if width is None:
        return None
    args = list(node.args)
    if node.target is aten.index.Tensor:
        indices = args[1]
        if not (isinstance(indices, list | tuple) and len(indices) == 2 and indices[0] is None):
            return None
        return constant_positions(program, indices[1], width)
    dim = as_int(args[1]) if len(args) > 1 else 0
    if src is None or dim % src.dim() != 1:
        return None
    if node.target is aten.select.int:
        return [as_int(args[2]) % width]
    return picked_positions(program, node, width)


def constant_positions(program: Program, index: Any, size: int) -> list[int] | None:
    """The positions a constant 1-D index tensor (an index list in the model) names, of a dim of ``size``."""
    idx = constant_value(program, index)
    return None if idx is None or idx.dim() != 1 else [int(i) % size for i in idx.tolist()]


def picked_positions(program: Program, node: torch.fx.Node, size: int) -> list[int] | None:
    """Positions of its dim (of ``size``) that ``slice``/``narrow``/``index_select`` keeps, in output order."""
    args = list(node.args)
    if node.target is aten.index_select.default:
        return constant_positions(program, args[2], size)
    if node.target is aten.narrow.default:
        start = as_int(args[2]) % size
        return list(range(start, start + as_int(args[3])))
    return slice_positions(args, size)
