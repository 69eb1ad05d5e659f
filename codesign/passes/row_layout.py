"""Rows first: rewrite graph regions that move the candidate rows off dim 0 so that they stay there.

``nn.MultiheadAttention`` (its own code transposes to ``[fields, batch, d]`` even with
``batch_first=True``), sequence-first transformer code and hand-written attention move the batch off
dim 0: ``x.transpose(0, 1)``, heads merged into the batch (``view(F, B * H, dh)``), then back. Role
propagation and request sharing follow rows on dim 0, so such a region is candidate-level as a whole
and the user work in it (Q/K/V projections of user fields) is never shared.

This rewrite carries each value of such a region as a *layout* of a rows-first tensor, its base: the
value is ``base.permute(order)`` with runs of consecutive dims merged. View ops (transpose, permute,
view/reshape, (un)flatten, (un)squeeze, select) only change the layout; element-wise ops, Linear over
the last dim and softmax run on the base. Where the region's value has its rows alone on dim 0 again,
it is rebuilt from the base by a permute that keeps dim 0 and flattens (row views); an op the rewrite
does not know gets the original value, rebuilt the same way. Exact: the same ops on the same numbers,
in another memory order.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any

import sympy
import torch
import torch.fx

from codesign.analysis.graph_queries import RESHAPE_OPS, as_int, node_value
from codesign.analysis.shapes import symbolic_dim
from codesign.ir.program import Program
from codesign.passes.graph_edit import insert_call

__all__ = ["rows_first"]

aten = torch.ops.aten
Node = torch.fx.Node

# every one is a reshape to its output's shape as far as the layout goes
_RESHAPES = RESHAPE_OPS | frozenset(
    {
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
    }
)
_PERMUTES = frozenset({aten.transpose.int, aten.permute.default, aten.t.default})
_LAYOUT_OPS = _RESHAPES | _PERMUTES | {aten.select.int}
# a copy in another memory order is the same value: the base needs none
_SAME_VALUE = frozenset(
    {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}
)
_ELEMENTWISE = frozenset(
    {
        aten.relu.default,
        aten.gelu.default,
        aten.sigmoid.default,
        aten.tanh.default,
        aten.silu.default,
        aten.exp.default,
        aten.neg.default,
        aten.abs.default,
        aten.mul.Scalar,
        aten.add.Scalar,
        aten.sub.Scalar,
        aten.div.Scalar,
        aten.pow.Tensor_Scalar,
        aten._to_copy.default,
        aten.to.dtype,
        aten.dropout.default,
    }
)
_NEEDS_STRIDES = frozenset({aten.view.default, aten.as_strided.default})
_BINARY = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor})
_MATMULS = frozenset({aten.bmm.default, aten.matmul.default})
_SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default, aten.log_softmax.int})


@dataclasses.dataclass(frozen=True)
class _Layout:
    base: Node  # rows (the candidate count) on dim 0, nowhere else
    dims: tuple[tuple[int, ...], ...]  # per dim of the value: the base dims merged into it, in order


def _eq(a: Any, b: Any) -> bool:
    return bool(sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0)


def _divides(a: Any, b: Any) -> bool:
    """``a`` divides ``b`` (sizes: ints or polynomials in the shape symbols)."""
    quotient = sympy.cancel(sympy.sympify(b) / sympy.sympify(a))
    _, denominator = sympy.fraction(quotient)
    return bool(denominator == 1) and not (quotient.is_Number and quotient < 1)


class _RowsFirst:
    def __init__(self, program: Program, rows: Any) -> None:
        self.program = program
        self.graph = program.graph
        self.rows = rows
        self.frame: dict[Node, _Layout] = {}
        self.rebuilt: dict[tuple[Node, bool], Node] = {}  # (value, for a strided view) -> rebuilt
        self.regions = 0
        self.exits = 0  # values back on rows-first layout: where the rewrite pays
        self.abandon = False  # a region value meets an op no rebuilt value can stand in for

    # ---- helpers -----------------------------------------------------------------------------------

    def emit(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Node:
        return insert_call(self.graph, target, args, kwargs)

    def sizes(self, node: Node) -> list[Any]:
        val = node_value(node)
        assert val is not None
        return [sympy.sympify(symbolic_dim(d)) for d in val.shape]

    def rows_alone_first(self, node: Any) -> bool:
        """A tensor value whose dim 0 is the candidate count and no other dim mentions it."""
        val = node_value(node)
        if val is None or val.dim() == 0 or not _eq(symbolic_dim(val.shape[0]), self.rows):
            return False
        symbols = sympy.sympify(self.rows).free_symbols
        return not any(sympy.sympify(symbolic_dim(d)).free_symbols & symbols for d in val.shape[1:])

    @staticmethod
    def is_rows_first(layout: _Layout) -> bool:
        return bool(layout.dims) and layout.dims[0] == (0,)

    def remap(self, layout: _Layout, base: Node, mapping: Mapping[int, tuple[int, ...]]) -> _Layout:
        dims = tuple(tuple(x for a in g for x in mapping[a]) for g in layout.dims)
        return _Layout(base, dims)

    # ---- base edits --------------------------------------------------------------------------------

    def split_atom(self, layout: _Layout, atom: int, first: int) -> _Layout:
        size = int(self.sizes(layout.base)[atom])
        base = self.emit(aten.unflatten.int, (layout.base, atom, [first, size // first]))
        n = len(self.sizes(layout.base))
        mapping = {a: (a,) if a < atom else (a, a + 1) if a == atom else (a + 1,) for a in range(n)}
        return self.remap(layout, base, mapping)

    def drop_atom(self, layout: _Layout, atom: int, base: Node) -> _Layout:
        n = len(self.sizes(layout.base))
        mapping = {a: (a,) if a < atom else () if a == atom else (a - 1,) for a in range(n)}
        return self.remap(layout, base, mapping)

    def atoms_last(self, layout: _Layout, atoms: tuple[int, ...]) -> tuple[_Layout, int]:
        """A layout whose base ends with ``atoms`` merged into one dim (its index is returned)."""
        n = len(self.sizes(layout.base))
        if atoms != tuple(range(n - len(atoms), n)):
            order = [a for a in range(n) if a not in atoms] + list(atoms)
            base = self.emit(aten.permute.default, (layout.base, order))
            layout = self.remap(layout, base, {a: (order.index(a),) for a in range(n)})
        start = n - len(atoms)
        if len(atoms) > 1:
            base = self.emit(aten.flatten.using_ints, (layout.base, start, n - 1))
            merged = {a: (a,) if a < start else (start,) if a == start else () for a in range(n)}
            dims = tuple(tuple(dict.fromkeys(x for a in g for x in merged[a])) for g in layout.dims)
            layout = _Layout(base, dims)
        return layout, start

    def rebuild(self, layout: _Layout, contiguous: bool = False) -> Node:
        """The value a layout stands for, from its base: permute, then merge runs / add size-1 dims.

        ``contiguous``: for an op that reads strides (``view``), as the original value may have been.
        """
        order = [a for g in layout.dims for a in g]
        x = layout.base
        if order != list(range(len(order))):
            x = self.emit(aten.permute.default, (x, order))
        if contiguous:  # the base itself may be a strided view (a select, an einsum's output)
            x = self.emit(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
        starts = [sum(len(g) for g in layout.dims[:i]) for i in range(len(layout.dims))]
        for group, start in reversed(list(zip(layout.dims, starts, strict=True))):
            if not group:
                x = self.emit(aten.unsqueeze.default, (x, start))
            elif len(group) > 1:
                x = self.emit(aten.flatten.using_ints, (x, start, start + len(group) - 1))
        return x

    # ---- layout ops --------------------------------------------------------------------------------

    def reshape(self, layout: _Layout, target: list[Any]) -> _Layout | None:
        """Regroup the layout's base dims (splitting static ones where needed) into dims of ``target``."""
        for _ in range(16):
            plan = self._plan_reshape(layout, target)
            if plan is None or isinstance(plan, _Layout):
                return None if plan is None else self.squeeze_units(plan)
            atom, first = plan
            layout = self.split_atom(layout, atom, first)
        return None

    def squeeze_units(self, layout: _Layout) -> _Layout:
        """Size-1 base dims squeezed out (a group of only such dims becomes a size-1 dim): a leading
        ``[B, 1, E] -> [1, B, E] -> [B, E]`` is then plainly rows first."""
        while True:
            sizes = self.sizes(layout.base)
            unit = next((a for g in layout.dims for a in g if a != 0 and _eq(sizes[a], 1)), None)
            if unit is None:
                return layout
            base = self.emit(aten.squeeze.dim, (layout.base, unit))
            layout = self.drop_atom(layout, unit, base)

    def _plan_reshape(self, layout: _Layout, target: list[Any]) -> _Layout | tuple[int, int] | None:
        sizes = self.sizes(layout.base)
        atoms = [a for g in layout.dims for a in g]
        i, dims = 0, []
        for want in target:
            group: list[int] = []
            have: Any = sympy.Integer(1)
            while not _eq(have, want):
                if i >= len(atoms):
                    return None
                size = sizes[atoms[i]]
                if _divides(have * size, want):
                    group.append(atoms[i])
                    have, i = have * size, i + 1
                    continue
                ratio = sympy.cancel(sympy.sympify(want) / have)
                if (
                    size.is_Integer
                    and ratio.is_Integer
                    and 1 < int(ratio) < int(size)
                    and int(size) % int(ratio) == 0
                ):
                    return atoms[i], int(ratio)  # split this base dim, then plan again
                return None
            dims.append(tuple(group))
        while i < len(atoms) and _eq(sizes[atoms[i]], 1):  # trailing size-1 base dims join the last dim
            dims[-1] = (*dims[-1], atoms[i])
            i += 1
        return _Layout(layout.base, tuple(dims)) if i == len(atoms) and dims else None

    def step(self, node: Node, layout: _Layout) -> _Layout | None:
        """The layout of ``node``'s value when its first input has ``layout``; None if unknown."""
        t, args = node.target, list(node.args)
        out = node_value(node)
        rank = len(layout.dims)
        if t in _RESHAPES:
            return None if out is None else self.reshape(layout, [symbolic_dim(d) for d in out.shape])
        if t is aten.t.default:
            return _Layout(layout.base, layout.dims[::-1]) if rank == 2 else None
        if t is aten.transpose.int:
            a, b = (as_int(d) % rank for d in args[1:3])
            dims = list(layout.dims)
            dims[a], dims[b] = dims[b], dims[a]
            return _Layout(layout.base, tuple(dims))
        if t is aten.permute.default:
            return _Layout(layout.base, tuple(layout.dims[as_int(d) % rank] for d in args[1]))  # type: ignore[union-attr]
        if t is aten.select.int:
            d = as_int(args[1]) % rank
            group = layout.dims[d]
            rest = layout.dims[:d] + layout.dims[d + 1 :]
            if not group:
                return _Layout(layout.base, rest)
            if len(group) != 1 or group[0] == 0:
                return None
            base = self.emit(aten.select.int, (layout.base, group[0], args[2]))
            return self.drop_atom(_Layout(layout.base, rest), group[0], base)
        if t in _SAME_VALUE:
            return layout
        if t in _ELEMENTWISE:
            return _Layout(self.emit(t, (layout.base, *args[1:]), dict(node.kwargs)), layout.dims)
        if t in _SOFTMAX:
            group = layout.dims[as_int(args[1]) % rank]
            if len(group) != 1 or group[0] == 0:
                return None
            return _Layout(self.emit(t, (layout.base, group[0], *args[2:]), dict(node.kwargs)), layout.dims)
        if t is aten.linear.default:
            return self.linear(node, layout)
        return None

    def binary(self, node: Node) -> _Layout | None:
        a, b = node.args[0], node.args[1]
        la, lb = self.frame.get(a), self.frame.get(b)  # type: ignore[arg-type]
        if la is not None and lb is not None:
            if la.dims != lb.dims or not all(
                _eq(x, y) for x, y in zip(self.sizes(la.base), self.sizes(lb.base), strict=False)
            ):
                return None
            return _Layout(self.emit(node.target, (la.base, lb.base), dict(node.kwargs)), la.dims)
        layout, other = (la, b) if la is not None else (lb, a)
        assert layout is not None
        ordered = (lambda base: (base, other)) if la is not None else (lambda base: (other, base))
        if isinstance(other, int | float):
            return _Layout(self.emit(node.target, ordered(layout.base), dict(node.kwargs)), layout.dims)
        val = node_value(other)
        last = layout.dims[-1] if layout.dims else ()
        n = len(self.sizes(layout.base))
        if val is not None and val.dim() <= 1 and len(last) == 1 and last[0] == n - 1:
            # a per-feature vector (bias, scale) broadcast over the last dim
            return _Layout(self.emit(node.target, ordered(layout.base), dict(node.kwargs)), layout.dims)
        return None

    def matmul(self, node: Node) -> _Layout | None:
        """Batched matmul of two layouts (scores, weighted sums) as one ``einsum`` over their bases."""
        a, b = node.args
        la, lb = self.frame.get(a), self.frame.get(b)  # type: ignore[arg-type]
        if la is None or lb is None or len(la.dims) != len(lb.dims) or len(la.dims) < 3:
            return None
        m, k, k2, n = la.dims[-2], la.dims[-1], lb.dims[-2], lb.dims[-1]
        if not all(len(g) == 1 and g[0] != 0 for g in (m, k, k2, n)):
            return None
        sa, sb = self.sizes(la.base), self.sizes(lb.base)
        letters_a = {atom: chr(ord("a") + atom) for atom in range(len(sa))}
        letters_b: dict[int, str] = {k2[0]: letters_a[k[0]]}
        for ga, gb in zip(la.dims[:-2], lb.dims[:-2], strict=True):
            if len(ga) != len(gb) or not all(_eq(sa[x], sb[y]) for x, y in zip(ga, gb, strict=True)):
                return None
            letters_b.update({y: letters_a[x] for x, y in zip(ga, gb, strict=True)})
        if set(letters_b) != set(range(len(sb))) - {n[0]}:
            return None
        letters_b[n[0]] = chr(ord("a") + len(sa))
        batch = [x for g in la.dims[:-2] for x in g]
        if 0 not in batch:
            return None
        out_atoms = [0, *(x for x in sorted(batch) if x != 0)]
        out = "".join(letters_a[x] for x in out_atoms) + letters_a[m[0]] + letters_b[n[0]]
        equation = (
            "".join(letters_a[x] for x in range(len(sa)))
            + ","
            + "".join(letters_b[y] for y in range(len(sb)))
            + "->"
            + out
        )
        base = self.emit(aten.einsum.default, (equation, [la.base, lb.base]))
        position = {x: i for i, x in enumerate(out_atoms)}
        dims = tuple(tuple(position[x] for x in g) for g in la.dims[:-2])
        return _Layout(base, (*dims, (len(out_atoms),), (len(out_atoms) + 1,)))

    def linear(self, node: Node, layout: _Layout) -> _Layout | None:
        last = layout.dims[-1] if layout.dims else ()
        if not last or 0 in last:
            return None
        layout, _ = self.atoms_last(layout, last)
        base = self.emit(aten.linear.default, (layout.base, *node.args[1:]), dict(node.kwargs))
        return _Layout(base, layout.dims)

    # ---- the walk ----------------------------------------------------------------------------------

    def enter(self, node: Node) -> _Layout | None:
        """A layout op that takes rows-first values off dim 0 starts a region."""
        first = node.args[0] if node.args else None
        if node.target not in _LAYOUT_OPS or not self.rows_alone_first(first):
            return None
        out = node_value(node)
        if out is None or out.dim() == 0 or self.rows_alone_first(node):
            return None
        assert isinstance(first, Node)
        identity = _Layout(first, tuple((d,) for d in range(len(self.sizes(first)))))
        return self.step(node, identity)

    def visit(self, node: Node) -> None:
        inside = [a for a in node.all_input_nodes if a in self.frame]
        with self.graph.inserting_before(node):
            if not inside:
                layout = self.enter(node) if node.op == "call_function" else None
                if layout is not None:
                    self.regions += 1
            elif node.op != "call_function":
                layout = None
            elif node.target in _BINARY and len(node.args) == 2:
                layout = self.binary(node)
            elif node.target in _MATMULS and len(node.args) == 2 and not node.kwargs:
                layout = self.matmul(node)
            elif (
                node.args
                and isinstance(node.args[0], Node)
                and node.args[0] in self.frame
                and len(inside) == 1
            ):
                layout = self.step(node, self.frame[node.args[0]])
            else:
                layout = None
            if layout is None:
                if node.target is aten.as_strided.default:
                    self.abandon = True  # reads the original storage layout: no rebuilt value equals it
                strided = _strides_matter(node)
                for a in inside:  # an op the rewrite does not know: the value it read before
                    if (a, strided) not in self.rebuilt:
                        self.rebuilt[a, strided] = self.rebuild(self.frame[a], contiguous=strided)
                    node.replace_input_with(a, self.rebuilt[a, strided])
                return
            if self.is_rows_first(layout):
                strided = any(_strides_matter(u) for u in node.users)
                node.replace_all_uses_with(self.rebuild(layout, contiguous=strided))
                self.exits += 1
            else:
                self.frame[node] = layout

    def erase_dead(self) -> None:
        done = set(self.frame)
        for node in reversed(list(self.graph.nodes)):
            if node.users or node.op != "call_function":
                continue
            if node in done or node.target in _LAYOUT_OPS | _SAME_VALUE or _is_size_arith(node):
                self.graph.erase_node(node)


def _aliases(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    returns = list(getattr(schema, "returns", None) or [])
    return bool(returns) and returns[0].alias_info is not None


def _strides_matter(node: Node, depth: int = 6) -> bool:
    """Whether ``node`` (a reader of a rebuilt value) or a view of its output through views reads strides
    (``view`` needs them compatible): the rebuilt value is then made contiguous, as the original may be."""
    if node.op != "call_function":
        return False
    if node.target in _NEEDS_STRIDES:
        return True
    return depth > 0 and _aliases(node) and any(_strides_matter(u, depth - 1) for u in node.users)


def _is_size_arith(node: Node) -> bool:
    return node.target in (aten.sym_size.int, operator.mul, operator.add, operator.floordiv, math.prod)


def rows_first(program: Program, rows: Any) -> int:
    """Rewrite ``program.graph`` in place so no value moves its ``rows`` (a size) off dim 0.

    Returns the number of regions rewritten. A graph whose regions all end in ops the rewrite does not
    know (nothing comes back rows first), or where a region value reaches ``as_strided``, is left
    unchanged. Where some region does come back, regions that do not are rewritten too (their values
    rebuilt for the unknown op: the same values, possibly one more copy).
    """
    if not sympy.sympify(rows).free_symbols:
        return 0  # a static row count cannot be told apart from other dims of the same size
    trial = _RowsFirst(program.shallow_copy(), rows)
    for node in list(trial.graph.nodes):
        trial.visit(node)
    if not trial.exits or trial.abandon:
        return 0
    walk = _RowsFirst(program, rows)
    for node in list(program.graph.nodes):
        walk.visit(node)
    walk.erase_dead()
    return walk.regions
