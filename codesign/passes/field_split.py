"""Field splitting: make the user part of mixed user/candidate tensors explicit, so sharing can reach it.

Ranking models put user and candidate features side by side on one axis: ``stack(embs, 1)`` into
``[N, F, d]``, ``cat([user, ad], -1)``, columns of one flat feature tensor. Such a tensor is
candidate-level as a whole, yet its user positions are identical on every row of a request. This
rewrite carries each such value as *groups* of positions along its field axis (one node per group:
the user positions, the candidate positions) through every op that treats positions independently
(element-wise ops, casts, lookups, views, per-field projections, slices and index lists), and
decomposes the ops that combine positions:

* a contraction over the axis (``Linear`` over concatenated features, ``mm``, ``tensordot``, the
  cross-layer projection) becomes one product per group: ``W x = W_u x_u + W_c x_c``;
* a reduction over the axis (FM's ``sum`` over fields, ``mean``, ``amax``) reduces each group, then
  combines them;
* a Gram matrix ``bmm(T, T^T)`` (pairwise dot products) is built from its blocks, ``T_u T_u^T`` alone;
* outer products ``x[:, :, None] * y[:, None]`` (CIN) keep the user x user block apart.

Groups whose inputs are all request-level are then request-level by the ordinary role rules, and
request sharing computes them once per request. Where an op cannot take groups, the value is put
back together (``cat`` in group order, then one ``index_select`` if the original order differs).
Every step is exact: the same products and sums, re-associated at most.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from codesign.analysis.graph_queries import RESHAPE_OPS, as_int, node_value
from codesign.analysis.roles import (
    Role,
    constant_positions,
    infer_role,
    picked_positions,
    propagate_roles,
    request_column_inputs,
)
from codesign.analysis.shapes import static_size
from codesign.ir.program import Program
from codesign.passes.graph_edit import insert_call, list_arg, param_value, register_constant

__all__ = ["SplitStats", "split_fields"]

aten = torch.ops.aten
Node = torch.fx.Node


@dataclasses.dataclass
class SplitStats:
    """What one run of :func:`split_fields` did."""

    values_split: int = 0  # mixed values carried as groups (sources and every op that kept them)
    contractions_split: int = 0  # linear / mm / tensordot / conv over a mixed axis, one product per group
    reductions_split: int = 0
    grams_split: int = 0  # bmm(T, T^T) built from blocks
    outer_products_split: int = 0
    rebuilt: int = 0  # values put back together for an op that needs the whole tensor


@dataclasses.dataclass(frozen=True)
class _Group:
    positions: tuple[int, ...]  # positions along the split axis, in the order the node holds them
    node: Node
    role: Role


@dataclasses.dataclass(frozen=True)
class _Split:
    axis: int
    size: int
    groups: tuple[_Group, ...]
    value: torch.Tensor  # the (fake) value of the whole tensor: shapes and dtype

    def with_groups(
        self, groups: Sequence[_Group], axis: int | None = None, size: int | None = None
    ) -> _Split:
        return _Split(
            self.axis if axis is None else axis,
            self.size if size is None else size,
            tuple(groups),
            self.value,
        )


_UNARY = frozenset(
    {
        aten.relu.default,
        aten.sigmoid.default,
        aten.tanh.default,
        aten.gelu.default,
        aten.silu.default,
        aten.exp.default,
        aten.log.default,
        aten.neg.default,
        aten.abs.default,
        aten.log1p.default,
        aten.rsqrt.default,
        aten.sqrt.default,
        aten.square.default,
        aten.pow.Tensor_Scalar,
        aten.mul.Scalar,
        aten.add.Scalar,
        aten.sub.Scalar,
        aten.div.Scalar,
        aten.clamp.default,
        aten.leaky_relu.default,
        aten.elu.default,
        aten.hardtanh.default,
        aten._to_copy.default,
        aten.to.dtype,
        aten.clone.default,
        aten.contiguous.default,
        aten.alias.default,
        aten.detach.default,
        aten.dropout.default,
        aten.eq.Scalar,
        aten.ne.Scalar,
        aten.gt.Scalar,
        aten.lt.Scalar,
        aten.ge.Scalar,
        aten.le.Scalar,
        aten.masked_fill.Scalar,
    }
)
_BINARY = frozenset(
    {
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.maximum.default,
        aten.minimum.default,
        aten.where.self,
        aten.masked_fill.Tensor,
        aten.pow.Tensor_Tensor,
        aten.eq.Tensor,
        aten.ne.Tensor,
    }
)
_RESHAPES = RESHAPE_OPS
_REDUCTIONS = frozenset({aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default})
_LAST_DIM_OPS = frozenset({aten.softmax.int, aten._softmax.default, aten.log_softmax.int})


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _combine(roles: Sequence[Role]) -> Role:
    if Role.CANDIDATE in roles:
        return Role.CANDIDATE
    return Role.REQUEST if Role.REQUEST in roles else Role.PARAM


class _Splitter:
    """One walk over the graph in order, carrying mixed values as groups (see the module docstring)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.graph = program.graph
        self.roles = propagate_roles(program)  # by node name, kept current as the walk rewires nodes
        self.column_inputs = request_column_inputs(program)  # by name; infer_role adds whole-row views
        self.request_cols = {
            node: self.column_inputs[node.name]
            for node in program.placeholders().values()
            if node.name in self.column_inputs
        }
        self.splits: dict[Node, _Split] = {}
        # a group node that is the blocks of an outer product side by side: (column axis, columns,
        # [(column positions, block node)])
        self.block_parts: dict[Node, tuple[int, int, list[tuple[tuple[int, ...], Node]]]] = {}
        self.rebuilt: dict[Node, Node] = {}
        self.stats = SplitStats()
        self.new_nodes: list[Node] = []

    # ---- building blocks -------------------------------------------------------------------------

    def role(self, value: Any) -> Role:
        return self.roles.get(value.name, Role.CANDIDATE) if isinstance(value, Node) else Role.PARAM

    def emit(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Node:
        """A new node (inserted before the node being rewritten) with the role of its inputs."""
        node = insert_call(self.graph, target, args, kwargs)  # with its fake value: later rules read shapes
        self.roles[node.name] = infer_role(self.program, node, self.roles, self.column_inputs)
        self.new_nodes.append(node)
        return node

    def copy_with(self, node: Node, mapping: dict[Node, Any], args: tuple[Any, ...] | None = None) -> Node:
        """``node`` re-issued with some inputs swapped (and optionally new positional args)."""
        new_args = torch.fx.node.map_arg(node.args if args is None else args, lambda a: mapping.get(a, a))
        new_kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: mapping.get(a, a))
        return self.emit(node.target, tuple(new_args), dict(new_kwargs))

    def index_const(self, positions: Sequence[int], name: str) -> Node:
        node = register_constant(
            self.program, f"_fields_{name}", torch.tensor(list(positions), dtype=torch.int64)
        )
        self.roles[node.name] = Role.PARAM
        return node

    def pick(self, value: Node, axis: int, local: Sequence[int], length: int, name: str) -> Node:
        """``value`` restricted to positions ``local`` of ``axis`` (a slice when contiguous, no-op when all)."""
        local = list(local)
        if local == list(range(length)):
            return value
        if local == list(range(local[0], local[0] + len(local))):
            return self.emit(aten.slice.Tensor, (value, axis, local[0], local[0] + len(local)))
        return self.emit(aten.index_select.default, (value, axis, self.index_const(local, name)))

    def weight_rows(self, weight: Node, dim: int, positions: Sequence[int], name: str) -> Node:
        """The slice of a parameter along ``dim`` that multiplies ``positions``: a new buffer when the
        weight is a stored tensor, else an ``index_select`` node (constant folding may fold it)."""
        stored = param_value(self.program, weight)
        if stored is not None:
            part = stored.detach().index_select(dim, torch.tensor(list(positions), dtype=torch.int64))
            node = register_constant(self.program, f"_fields_{name}", part, [str(weight.target)])
            self.roles[node.name] = Role.PARAM
            return node
        return self.pick(weight, dim, positions, -1, name)

    def merge_by_role(self, split: _Split, name: str) -> list[_Group]:
        """At most one group per role class (request and parameter positions together, candidates)."""
        classes: dict[bool, list[_Group]] = {}
        for g in split.groups:
            classes.setdefault(g.role is Role.CANDIDATE, []).append(g)
        merged = []
        for is_cand, gs in sorted(classes.items()):
            if len(gs) == 1:
                merged.append(gs[0])
                continue
            node = self.emit(aten.cat.default, ([g.node for g in gs], split.axis))
            positions = tuple(p for g in gs for p in g.positions)
            merged.append(
                _Group(positions, node, Role.CANDIDATE if is_cand else _combine([g.role for g in gs]))
            )
        return merged

    def whole(self, node: Node) -> Node:
        """The split value ``node`` as one tensor in its original order (built once, then reused)."""
        if node in self.rebuilt:
            return self.rebuilt[node]
        split = self.splits[node]
        with self.graph.inserting_before(self._anchor):
            parts = [g.node for g in split.groups]
            full = self.emit(aten.cat.default, (parts, split.axis))
            order = [p for g in split.groups for p in g.positions]
            if order != list(range(split.size)):
                inverse = [0] * split.size
                for i, p in enumerate(order):
                    inverse[p] = i
                full = self.emit(
                    aten.index_select.default,
                    (full, split.axis, self.index_const(inverse, f"{node.name}_order")),
                )
        self.rebuilt[node] = full
        self.stats.rebuilt += 1
        return full

    def per_group(
        self,
        node: Node,
        split_input: Node,
        split: _Split,
        axis: int,
        args_for: Callable[[_Group], tuple[Any, ...]] | None = None,
    ) -> _Split:
        """``node`` applied to each group of ``split_input`` (its other arguments unchanged)."""
        groups = []
        for g in split.groups:
            args = None if args_for is None else args_for(g)
            new = self.copy_with(node, {split_input: g.node}, args)
            groups.append(_Group(g.positions, new, self.role(new)))
        return split.with_groups(groups, axis=axis)

    # ---- the walk --------------------------------------------------------------------------------

    def run(self) -> SplitStats:
        self._split_inputs()
        for node in list(self.graph.nodes):
            self._anchor = node
            if node.op == "output":
                for a in node.all_input_nodes:
                    if a in self.splits:
                        node.replace_input_with(a, self.whole(a))
                continue
            if node.op != "call_function":
                continue
            with self.graph.inserting_before(node):
                split_inputs = [a for a in node.all_input_nodes if a in self.splits]
                result = self._rule(node) if split_inputs else self._source(node)
            if isinstance(result, _Split):
                self.splits[node] = dataclasses.replace(result, value=node.meta["val"])
                self.stats.values_split += 1
            elif isinstance(result, Node):
                node.replace_all_uses_with(result)
            elif result is _DROP:
                self.graph.erase_node(node)
            elif split_inputs:
                for a in split_inputs:
                    node.replace_input_with(a, self.whole(a))
            if result is None or (split_inputs and not isinstance(result, _Split)):
                # kept (perhaps with new inputs): its role follows its inputs' current roles
                self.roles[node.name] = infer_role(self.program, node, self.roles, self.column_inputs)
        self.graph.eliminate_dead_code()
        return self.stats

    # ---- sources: where a mixed value first appears --------------------------------------------------

    def _source(self, node: Node) -> _Split | None:
        if node.target in (aten.cat.default, aten.stack.default):
            return self._cat(node)
        return None

    def _split_inputs(self) -> None:
        """A flat feature tensor with request-level columns is a split value from the start: its user
        columns and its candidate columns (slices and index lists of it are then rules like any other)."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        first = placeholders[-1].next if placeholders else None
        for src, ranges in self.request_cols.items():
            val = node_value(src)
            assert first is not None
            width = static_size(val.shape[1]) if val is not None and val.dim() >= 2 else None
            if width is None:
                continue
            is_req = [any(a <= c < b for a, b in ranges) for c in range(width)]
            if all(is_req) or not any(is_req):
                continue
            groups = []
            with self.graph.inserting_before(first):
                for want in (True, False):
                    cols = [c for c in range(width) if is_req[c] is want]
                    part = self.pick(src, 1, cols, width, f"{src.name}_cols")
                    groups.append(_Group(tuple(cols), part, self.role(part)))
            self.splits[src] = _Split(1, width, tuple(groups), val)  # type: ignore[arg-type]

    def _cat(self, node: Node) -> _Split | None:
        """``cat``/``stack`` along a field axis: parts of different roles (or split parts) become groups."""
        parts = list_arg(node, 0)
        out = node_value(node)
        if (
            out is None
            or not parts
            or not all(isinstance(p, Node) and node_value(p) is not None for p in parts)
        ):
            return None
        is_stack = node.target is aten.stack.default
        dim = as_int(node.args[1]) if len(node.args) > 1 else 0
        axis = _norm(dim, out.dim())
        if axis == 0:
            return None
        groups: list[_Group] = []
        offset = 0
        for p in parts:
            if p in self.splits:
                s = self.splits[p]
                if is_stack or s.axis != axis:
                    return None
                groups += [_Group(tuple(offset + q for q in g.positions), g.node, g.role) for g in s.groups]
                offset += s.size
                continue
            width = 1 if is_stack else static_size(node_value(p).shape[axis])  # type: ignore[union-attr]
            if width is None:
                return None
            item = self.emit(aten.unsqueeze.default, (p, axis)) if is_stack else p
            groups.append(_Group(tuple(range(offset, offset + width)), item, self.role(p)))
            offset += width
        if len({g.role is Role.CANDIDATE for g in groups}) < 2:
            return None  # nothing user-level beside candidate positions: an ordinary value
        split = _Split(axis, offset, tuple(groups), out)
        return split.with_groups(self.merge_by_role(split, node.name))

    # ---- rules: an op that reads a split value -------------------------------------------------------

    def _rule(self, node: Node) -> _Split | Node | object | None:
        t = node.target
        first = node.args[0] if node.args else None
        if t is aten._assert_tensor_metadata.default:
            return _DROP  # a dtype check of the whole tensor; every group has the same dtype
        if t in (aten.cat.default, aten.stack.default):
            return self._cat(node)
        if t is aten.embedding.default and node.args[1] in self.splits:
            ids = node.args[1]
            assert isinstance(ids, Node)
            return self.per_group(node, ids, self.splits[ids], self.splits[ids].axis)
        if t is aten.einsum.default:
            return self._einsum(node)
        if not isinstance(first, Node) or first not in self.splits:
            if t in (aten.bmm.default, aten.matmul.default):
                return self._bmm(node)
            if t in _BINARY:
                return self._binary(node)
            return None
        split = self.splits[first]
        rank = split.value.dim()
        if t in _UNARY:
            return self.per_group(node, first, split, split.axis)
        if t in _BINARY:
            return self._binary(node)
        if t in _REDUCTIONS:
            return self._reduce(node, first, split)
        if t in _LAST_DIM_OPS:
            dim = _norm(as_int(node.args[1]), rank)
            return self.per_group(node, first, split, split.axis) if dim != split.axis else None
        if t is aten.layer_norm.default:
            shape = list(node.args[1])  # type: ignore[arg-type]
            return self.per_group(node, first, split, split.axis) if split.axis < rank - len(shape) else None
        if t is aten.linear.default:
            return self._linear(node, first, split)
        if t in (aten.mm.default, aten.addmm.default, aten.tensordot.default):
            return self._contract(node, first, split)
        if t is aten.conv1d.default:
            return self._conv1d(node, first, split)
        if t in (aten.bmm.default, aten.matmul.default):
            return self._bmm(node)
        if t in _RESHAPES:
            return self._reshape(node, first, split)
        return self._view(node, first, split)

    def _view(self, node: Node, first: Node, split: _Split) -> _Split | Node | None:
        t, args, rank, axis = node.target, list(node.args), split.value.dim(), split.axis
        if t is aten.unsqueeze.default:
            d = _norm(as_int(args[1]), rank + 1)
            return self.per_group(node, first, split, axis + 1 if d <= axis else axis)
        if t is aten.squeeze.dim:
            d = _norm(as_int(args[1]), rank)
            return None if d == axis else self.per_group(node, first, split, axis - 1 if d < axis else axis)
        if t is aten.transpose.int:
            a, b = _norm(as_int(args[1]), rank), _norm(as_int(args[2]), rank)
            new_axis = b if axis == a else a if axis == b else axis
            return self.per_group(node, first, split, new_axis)
        if t is aten.t.default:
            return self.per_group(node, first, split, 1 - axis) if rank == 2 else None
        if t is aten.permute.default:
            dims = [_norm(as_int(d), rank) for d in args[1]]  # type: ignore[union-attr]
            return self.per_group(node, first, split, dims.index(axis))
        if t is aten.expand.default:
            sizes = list(args[1])  # type: ignore[arg-type]
            shift = len(sizes) - rank

            def expand_args(g: _Group) -> tuple[Any, ...]:
                return (g.node, [-1 if i == axis + shift else s for i, s in enumerate(sizes)])

            return self.per_group(node, first, split, axis + shift, expand_args)
        if t in (aten.slice.Tensor, aten.select.int, aten.index_select.default, aten.narrow.default):
            dim = _norm(as_int(args[1]) if len(args) > 1 else 0, rank)
            if dim != axis:
                if t is aten.select.int:
                    return self.per_group(node, first, split, axis - 1 if dim < axis else axis)
                return self.per_group(node, first, split, axis)
            if t is aten.select.int:
                pos = _norm(as_int(args[2]), split.size)
                g = next(g for g in split.groups if pos in g.positions)
                return self.emit(aten.select.int, (g.node, axis, g.positions.index(pos)))
            picked = picked_positions(self.program, node, split.size)
            return None if picked is None else self._pick_positions(split, picked, node.name)
        if t is aten.index.Tensor:
            indices = list(args[1])  # type: ignore[arg-type]
            tensors = [i for i, v in enumerate(indices) if v is not None]
            if tensors != [axis]:
                return None
            picked = constant_positions(self.program, indices[axis], split.size)
            return None if picked is None else self._pick_positions(split, picked, node.name)
        if t is aten.sym_size.int:
            d = _norm(as_int(args[1]), rank)
            return None if d == axis else self.emit(aten.sym_size.int, (split.groups[0].node, d))
        return None

    def _pick_positions(self, split: _Split, picked: list[int], name: str) -> _Split | Node:
        """Output position j reads input position ``picked[j]`` (a slice, an index list, a permutation)."""
        groups = []
        for g in split.groups:
            local = {p: i for i, p in enumerate(g.positions)}
            js = [j for j, p in enumerate(picked) if p in local]
            if js:
                node = self.pick(g.node, split.axis, [local[picked[j]] for j in js], len(g.positions), name)
                groups.append(_Group(tuple(js), node, g.role))
        if len(groups) == 1 and list(groups[0].positions) == list(range(len(picked))):
            return groups[0].node
        return split.with_groups(groups, size=len(picked))

    def _reshape(self, node: Node, first: Node, split: _Split) -> _Split | None:
        """A view that keeps the split axis's positions in whole blocks: ``[N, F, d] -> [N, F*d]`` and back."""
        src, out = split.value, node_value(node)
        if out is None or out.dim() < 2:
            return None
        axis = split.axis
        trailing = [static_size(s) for s in src.shape[axis + 1 :]]
        out_sizes = [static_size(s) for s in out.shape]
        if None in trailing or None in out_sizes[1:]:
            return None
        sizes = [int(s) for s in out_sizes[1:]]  # type: ignore[arg-type]  # checked above
        block = math.prod(
            int(s or 0) for s in trailing
        )  # elements per input position (all known: checked above)
        total = split.size * block
        b, acc = out.dim(), 1
        while b > 1 and acc < total:
            b -= 1
            acc *= sizes[b - 1]
        if acc != total or b == 0:
            return None
        inner = math.prod(sizes[b:])  # elements per output position
        layouts = _regroup(split, block, inner)
        if layouts is None:
            return None  # an output position would straddle a user and a candidate field
        pieces: list[tuple[tuple[int, ...], _Group]] = []
        for g, positions in zip(split.groups, layouts, strict=True):
            pieces += self._block_pieces(g, positions, split, src, axis, block, inner)
        groups = []
        for positions, g in pieces:
            # the row count stays -1: a size node read from the N-row input would be wrong on R rows
            shape = [-1] + [len(positions) if i == b else size for i, size in enumerate(sizes, 1)]
            new = self.emit(aten.reshape.default, (g.node, shape))
            groups.append(_Group(positions, new, g.role))
        return split.with_groups(groups, axis=b, size=split.size * block // inner)

    def _block_pieces(
        self,
        g: _Group,
        positions: tuple[int, ...],
        split: _Split,
        src: torch.Tensor,
        axis: int,
        block: int,
        inner: int,
    ) -> list[tuple[tuple[int, ...], _Group]]:
        """The group as it is, or, when it is the blocks of an outer product whose column axis this reshape
        merges into the split axis, one piece per block: CIN's user x user block stays a group of its own."""
        parts = self.block_parts.get(g.node)
        if parts is None or parts[0] != axis + 1 or block % inner:
            return [(positions, g)]
        _, ncols, blocks = parts
        tail = [static_size(s) for s in src.shape[axis + 2 :]]
        if None in tail or math.prod(tail) % inner:  # type: ignore[arg-type]
            return [(positions, g)]
        per_col = math.prod(tail) // inner  # type: ignore[arg-type]
        return [
            (
                tuple(
                    (p * ncols + q) * per_col + k for p in g.positions for q in cols for k in range(per_col)
                ),
                _Group(g.positions, b, self.role(b)),
            )
            for cols, b in blocks
        ]

    def _reduce(self, node: Node, first: Node, split: _Split) -> _Split | Node | None:
        """``sum``/``mean``/``amax``/``amin``: over other axes per group; over the split axis, per group then combined."""
        args, rank, axis = list(node.args), split.value.dim(), split.axis
        dims_arg = args[1] if len(args) > 1 else None
        if dims_arg is None:
            return None
        dims = [
            _norm(as_int(d), rank) for d in (dims_arg if isinstance(dims_arg, list | tuple) else [dims_arg])
        ]
        keepdim = bool(args[2]) if len(args) > 2 else bool(node.kwargs.get("keepdim", False))
        if 0 in dims or node.kwargs.get("dtype") is not None:
            return None
        if axis not in dims:
            new_axis = axis if keepdim else axis - sum(1 for d in dims if d < axis)
            return self.per_group(node, first, split, new_axis)
        t = node.target
        combiners: dict[Any, Any] = {
            aten.amax.default: aten.maximum.default,
            aten.amin.default: aten.minimum.default,
        }
        combine = combiners.get(t, aten.add.Tensor)
        per_target = aten.sum.dim_IntList if t is aten.mean.dim else t
        total: Node | None = None
        for g in self.merge_by_role(split, node.name):
            part = self.emit(per_target, (g.node, dims, keepdim))
            total = part if total is None else self.emit(combine, (total, part))
        assert total is not None
        if t is aten.mean.dim:
            extents = [static_size(split.value.shape[d]) for d in dims]
            if None in extents:
                return None
            count = math.prod(int(e or 0) for e in extents)  # all known: checked above
            total = self.emit(aten.div.Scalar, (total, count))
        self.stats.reductions_split += 1
        return total

    def _linear(self, node: Node, first: Node, split: _Split) -> _Split | Node | None:
        """``linear`` over the split axis: one product per group with its columns of W; else per group."""
        rank = split.value.dim()
        if split.axis != rank - 1:
            return self.per_group(node, first, split, split.axis)
        weight = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if not isinstance(weight, Node) or self.role(weight) is not Role.PARAM:
            return None
        parts = []
        groups = self.merge_by_role(split, node.name)
        for i, g in enumerate(sorted(groups, key=lambda g: g.role is not Role.CANDIDATE)):
            w = self.weight_rows(weight, 1, g.positions, f"{node.name}_w{i}")
            parts.append(self.emit(aten.linear.default, (g.node, w, bias) if i == 0 else (g.node, w)))
        self.stats.contractions_split += 1
        return self._sum(parts)

    def _contract(self, node: Node, first: Node, split: _Split) -> _Split | Node | None:
        """``mm``/``addmm``/``tensordot`` whose first operand's split axis is the contracted one."""
        t, args, rank = node.target, list(node.args), split.value.dim()
        if t is aten.addmm.default:
            return None  # the bias comes first: the split operand is args[1], handled below if ever needed
        weight = args[1]
        if not isinstance(weight, Node) or self.role(weight) is not Role.PARAM:
            return None
        if t is aten.mm.default:
            if split.axis != 1:
                return self.per_group(node, first, split, split.axis)
            w_dim = 0
        else:  # tensordot(a, b, dims_a, dims_b)
            dims_a = [_norm(as_int(d), rank) for d in args[2]]  # type: ignore[union-attr]
            if split.axis not in dims_a:
                free = [d for d in range(rank) if d not in dims_a]
                return self.per_group(node, first, split, free.index(split.axis))
            if len(dims_a) != 1:
                return None
            w_val = node_value(weight)
            if w_val is None:
                return None
            w_dim = _norm(as_int(args[3][0]), w_val.dim())  # type: ignore[index]
        parts = []
        for i, g in enumerate(self.merge_by_role(split, node.name)):
            w = self.weight_rows(weight, w_dim, g.positions, f"{node.name}_w{i}")
            parts.append(self.copy_with(node, {first: g.node}, (g.node, w, *args[2:])))
        self.stats.contractions_split += 1
        return self._sum(parts)

    def _conv1d(self, node: Node, first: Node, split: _Split) -> Node | None:
        """``conv1d`` over channels that are split fields (CIN's feature maps): one convolution per group."""
        args = list(node.args) + [None] * (7 - len(node.args))
        weight, bias, groups_arg = args[1], args[2], args[6]
        if split.axis != 1 or groups_arg not in (None, 1) or not isinstance(weight, Node):
            return None
        if self.role(weight) is not Role.PARAM:
            return None
        rest = [a for a in node.args[3:]]
        parts = []
        for i, g in enumerate(
            sorted(self.merge_by_role(split, node.name), key=lambda g: g.role is not Role.CANDIDATE)
        ):
            w = self.weight_rows(weight, 1, g.positions, f"{node.name}_w{i}")
            parts.append(self.emit(aten.conv1d.default, (g.node, w, bias if i == 0 else None, *rest)))
        self.stats.contractions_split += 1
        return self._sum(parts)

    def _einsum(self, node: Node) -> _Split | Node | None:
        """``einsum`` with split operands: a split letter kept in the output stays split (two operands
        split on two kept letters: an outer product, in blocks); a split letter summed away sums groups."""
        equation, operands = node.args[0], list_arg(node, 1)
        if not isinstance(equation, str) or "->" not in equation or "." in equation:
            return None
        ins, out = equation.replace(" ", "").split("->")
        letters = ins.split(",")
        if len(letters) != len(operands):
            return None
        split_ops = [(i, op) for i, op in enumerate(operands) if isinstance(op, Node) and op in self.splits]
        marks = {i: letters[i][self.splits[op].axis] for i, op in split_ops}
        if len(set(marks.values())) != len(marks):
            return None  # two operands split along the same letter: not handled
        for i in range(len(operands)):  # a split letter must not index any other operand
            if any(letter in letters[i] for j, letter in marks.items() if j != i):
                return None
        if len(split_ops) == 1:
            (i, op), letter = split_ops[0], marks[split_ops[0][0]]
            split = self.splits[op]

            def call(g: _Group) -> Node:
                ops = list(operands)
                ops[i] = g.node
                return self.emit(aten.einsum.default, (equation, ops))

            if letter in out:
                groups = [_Group(g.positions, n := call(g), self.role(n)) for g in split.groups]
                return _Split(out.index(letter), split.size, tuple(groups), node.meta["val"])
            self.stats.reductions_split += 1
            return self._sum([call(g) for g in self.merge_by_role(split, node.name)])
        if len(split_ops) == 2 and all(letter in out for letter in marks.values()):
            (ia, a), (ib, b) = sorted(split_ops, key=lambda x: out.index(marks[x[0]]))
            rows = dataclasses.replace(self.splits[a], axis=out.index(marks[ia]))
            cols = dataclasses.replace(self.splits[b], axis=out.index(marks[ib]))

            def block(ga: _Group, gb: _Group) -> Node:
                ops = list(operands)
                ops[ia], ops[ib] = ga.node, gb.node
                return self.emit(aten.einsum.default, (equation, ops))

            self.stats.outer_products_split += 1
            return self._blocks(node, rows, cols, block)
        return None

    def _sum(self, parts: list[Node]) -> Node:
        total = parts[0]
        for p in parts[1:]:
            total = self.emit(aten.add.Tensor, (total, p))
        return total

    def _bmm(self, node: Node) -> _Split | Node | None:
        """Batched products: rows or columns of a split operand stay groups; a Gram matrix is built from blocks."""
        a, b = node.args[0], node.args[1]
        sa = self.splits.get(a) if isinstance(a, Node) else None
        sb = self.splits.get(b) if isinstance(b, Node) else None
        if (sa is not None and sa.value.dim() != 3) or (sb is not None and sb.value.dim() != 3):
            return None
        if sa is not None and sb is None:
            return self.per_group(node, a, sa, 1) if sa.axis == 1 else None  # type: ignore[arg-type]
        if sb is not None and sa is None:
            return self.per_group(node, b, sb, 2) if sb.axis == 2 else None  # type: ignore[arg-type]
        assert sa is not None and sb is not None
        if sa.axis == 2 and sb.axis == 1:  # contraction over the split axis
            if [g.positions for g in sa.groups] != [g.positions for g in sb.groups]:
                return None
            parts = [
                self.emit(node.target, (ga.node, gb.node))
                for ga, gb in zip(sa.groups, sb.groups, strict=True)
            ]
            self.stats.contractions_split += 1
            return self._sum(parts)
        if sa.axis == 1 and sb.axis == 2:  # rows x columns: blocks, e.g. T T^T of pairwise dot products
            self.stats.grams_split += 1
            return self._blocks(node, sa, sb, lambda ga, gb: self.emit(node.target, (ga.node, gb.node)))
        return None

    def _blocks(
        self, node: Node, rows: _Split, cols: _Split, block: Callable[[_Group, _Group], Node]
    ) -> _Split:
        """A value split along two axes (rows along ``rows.axis``, columns along ``cols``'s axis in the
        output): one node per row group, holding its blocks side by side in the original column order."""
        col_axis = 2 if node.target in (aten.bmm.default, aten.matmul.default) else cols.axis
        col_order = [p for g in cols.groups for p in g.positions]
        inverse = None
        if col_order != list(range(cols.size)):
            inv = [0] * cols.size
            for i, p in enumerate(col_order):
                inv[p] = i
            inverse = self.index_const(inv, f"{node.name}_cols")
        groups = []
        for ga in rows.groups:
            parts = [block(ga, gb) for gb in cols.groups]
            row = self.emit(aten.cat.default, (parts, col_axis)) if len(parts) > 1 else parts[0]
            if inverse is not None:
                row = self.emit(aten.index_select.default, (row, col_axis, inverse))
            if len(parts) > 1:  # a reshape that merges rows and columns can keep the blocks apart
                self.block_parts[row] = (
                    col_axis,
                    cols.size,
                    [(gb.positions, b) for gb, b in zip(cols.groups, parts, strict=True)],
                )
            groups.append(_Group(ga.positions, row, self.role(row)))
        return _Split(rows.axis, rows.size, tuple(groups), node.meta["val"])

    def _binary(self, node: Node) -> _Split | None:
        """Element-wise ops with broadcasting: operands split the same way go group by group; operands
        without the axis (or of size 1 along it) broadcast; constant or user-level operands along the
        axis are sliced per group; two operands split on different axes (an outer product) give blocks."""
        out = node_value(node)
        if out is None:
            return None
        rank = out.dim()
        operands = [
            (i, a) for i, a in enumerate(node.args) if isinstance(a, Node) and node_value(a) is not None
        ]
        split_ops = [(i, a) for i, a in operands if a in self.splits]
        axes = {self.splits[a].axis + rank - self.splits[a].value.dim() for _, a in split_ops}
        if len(axes) == 2 and len(split_ops) == 2 and node.target in (aten.mul.Tensor, aten.add.Tensor):
            return self._outer(node, split_ops, rank)
        if len(axes) != 1:
            return None
        (axis,) = axes
        lead = self.splits[split_ops[0][1]]
        layout = [g.positions for g in lead.groups]
        for _, a in split_ops:
            if [g.positions for g in self.splits[a].groups] != layout:
                return None
        plain: dict[
            int, Node | None
        ] = {}  # operand index -> None (broadcasts) or the node to slice per group
        for i, a in operands:
            if a in self.splits:
                continue
            val = node_value(a)
            assert val is not None
            own = axis - (rank - val.dim())
            if own < 0 or static_size(val.shape[own]) == 1:
                plain[i] = None
            elif self.role(a) is Role.CANDIDATE:
                return None  # slicing a candidate-level operand per group buys nothing
            else:
                plain[i] = a
        groups = []
        for gi, g in enumerate(lead.groups):
            args = list(node.args)
            for i, a in operands:
                if a in self.splits:
                    args[i] = self.splits[a].groups[gi].node
                elif plain[i] is not None:
                    own = axis - (rank - node_value(a).dim())  # type: ignore[union-attr]
                    args[i] = self.pick(a, own, g.positions, lead.size, f"{node.name}_{i}")
            new = self.emit(node.target, tuple(args), dict(node.kwargs))
            groups.append(_Group(g.positions, new, self.role(new)))
        return _Split(axis, lead.size, tuple(groups), out)

    def _outer(self, node: Node, split_ops: list[tuple[int, Node]], rank: int) -> _Split | None:
        """``x[:, :, None] * y[:, None]``: blocks per (row group, column group)."""
        (ia, a), (ib, b) = split_ops
        sa, sb = self.splits[a], self.splits[b]
        if len(node.args) != 2:
            return None
        axis_a, axis_b = sa.axis + rank - sa.value.dim(), sb.axis + rank - sb.value.dim()
        if axis_a > axis_b:
            (ia, a, sa, axis_a), (ib, b, sb, axis_b) = (ib, b, sb, axis_b), (ia, a, sa, axis_a)
        rows = dataclasses.replace(sa, axis=axis_a)
        cols = dataclasses.replace(sb, axis=axis_b)

        def block(ga: _Group, gb: _Group) -> Node:
            args: list[Any] = [None, None]
            args[ia], args[ib] = ga.node, gb.node
            return self.emit(node.target, tuple(args))

        self.stats.outer_products_split += 1
        return self._blocks(node, rows, cols, block)


def _regroup(split: _Split, block: int, inner: int) -> list[tuple[int, ...]] | None:
    """Each group's positions after a reshape, when input positions hold ``block`` elements and output
    positions ``inner``: finer (``[N, F, d] -> [N, F*d]``: each field becomes d positions) or coarser
    (``[N, F*d] -> [N, F, d]``: d whole columns of one group become one field); None if a coarser
    position would mix groups or the group's columns are not whole aligned fields in order."""
    if block % inner == 0:
        per = block // inner
        return [tuple(p * per + k for p in g.positions for k in range(per)) for g in split.groups]
    if inner % block:
        return None
    k = inner // block
    layouts = []
    for g in split.groups:
        chunks = [g.positions[i : i + k] for i in range(0, len(g.positions), k)]
        if any(len(c) != k or c[0] % k or list(c) != list(range(c[0], c[0] + k)) for c in chunks):
            return None
        layouts.append(tuple(c[0] // k for c in chunks))
    return layouts


_DROP = object()  # a rule's answer: erase the node (it only checked the whole value)
_COLUMN_SOURCES = frozenset(
    {aten.slice.Tensor, aten.index_select.default, aten.index.Tensor, aten.narrow.default}
)


def split_fields(program: Program) -> tuple[SplitStats, list[Node]]:
    """Rewrite ``program.graph`` in place (see the module docstring); returns what it did and the new nodes.

    The caller recompiles; new nodes carry their fake values already.
    """
    splitter = _Splitter(program)
    stats = splitter.run()
    alive = set(program.graph.nodes)
    return stats, [n for n in splitter.new_nodes if n in alive]
