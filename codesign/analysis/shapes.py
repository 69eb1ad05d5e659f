"""Symbolic shapes of a captured graph, bound to the sizes of one concrete batch.

Captured shapes are symbolic in the candidate count (and jagged lengths). ``symbol_env`` reads the
binding off a sample batch; ``ConcreteShapes`` turns any node value's shape into ints under it, so
cost formulas work in plain integers. sympy is imported here at module level: torch.export (which
``codesign.ir`` needs) loads it anyway, so a lazy import would save nothing.
"""

from __future__ import annotations

import math
from typing import Any

import sympy
import torch
import torch.fx

from codesign.analysis.graph_queries import tensor_values
from codesign.ir.program import Program
from codesign.ir.request import RequestBatch, flatten_inputs

__all__ = ["ConcreteShapes", "static_size", "symbol_env", "symbolic_dim"]


def symbolic_dim(d: Any) -> Any:
    """The sympy expression of a (possibly symbolic) size: compare dims across nodes with ``==``."""
    return d.node.expr if isinstance(d, torch.SymInt) else d


def static_size(d: Any) -> int | None:
    """A size as a Python int when it is one (a SymInt whose expression is a number counts), else None.

    ``x.reshape(batch, -1)`` gives the ``-1`` dim as a SymInt equal to a constant; field rules need it.
    """
    if isinstance(d, int):
        return d
    expr = symbolic_dim(d)
    return int(expr) if getattr(expr, "is_number", False) else None


def symbol_env(program: Program, batch: RequestBatch) -> dict[sympy.Symbol, int]:
    """Each size symbol of the program's inputs bound to its size in ``batch``."""
    env: dict[sympy.Symbol, int] = {}
    leaves = dict(flatten_inputs(program.call_inputs(batch)))
    for path, node in program.placeholders().items():
        val = node.meta.get("val")
        actual = leaves.get(path)
        if not isinstance(val, torch.Tensor) or not isinstance(actual, torch.Tensor):
            continue
        for d, size in zip(val.shape, actual.shape, strict=False):
            e = symbolic_dim(d)
            if isinstance(e, sympy.Symbol):
                env[e] = int(size)
    return env


class ConcreteShapes:
    """Concrete shapes, sizes and byte counts of node values under one symbol binding.

    ``fallback`` stands in for unbacked (data-dependent) sizes left after binding: one per
    candidate row is the usual meaning of such a size in a ranking graph.
    """

    def __init__(self, env: dict[sympy.Symbol, int], fallback: int) -> None:
        self.env = env
        self.fallback = fallback
        # a graph repeats few size expressions (N, 16·N, ...) over thousands of node shapes
        self._dims: dict[Any, int] = {}

    def dim(self, d: Any) -> int:
        if isinstance(d, int):
            return d
        e = symbolic_dim(d)
        if not isinstance(e, sympy.Basic) or isinstance(e, sympy.Integer):
            return int(e)
        if e not in self._dims:
            self._dims[e] = self._bind(e)
        return self._dims[e]

    def _bind(self, e: sympy.Basic) -> int:
        value = e.xreplace(self.env)
        if not isinstance(value, sympy.Basic):
            return int(value)
        if value.free_symbols:  # unbacked (data-dependent) size: assume one per candidate row
            value = value.xreplace(dict.fromkeys(value.free_symbols, self.fallback))
        return int(value)  # type: ignore[arg-type]  # sympy's Basic has no __int__ in its stubs; a bound size is an Integer

    def shape(self, val: torch.Tensor) -> tuple[int, ...]:
        return tuple(self.dim(d) for d in val.shape)

    def numel(self, val: torch.Tensor) -> int:
        return math.prod(self.shape(val))

    def nbytes(self, val: torch.Tensor) -> int:
        return self.numel(val) * val.dtype.itemsize

    def rows(self, val: torch.Tensor) -> int:
        """Elements per last-dim vector: the M of a ``[..., K]`` GEMM operand."""
        return self.numel(val) // self.dim(val.shape[-1])

    def total_numel(self, obj: object) -> int:
        """Elements of every tensor value in ``obj`` (a node, or nested lists of nodes)."""
        return sum(self.numel(v) for v in tensor_values(obj))

    def total_bytes(self, obj: object) -> int:
        """Bytes of every tensor value in ``obj`` (a node, or nested lists of nodes)."""
        return sum(self.nbytes(v) for v in tensor_values(obj))

    def param_bytes(self, node: torch.fx.Node) -> int:
        """Bytes of the parameters and buffers (``get_attr`` inputs) ``node`` reads whole."""
        return sum(
            self.nbytes(v)
            for a in node.all_input_nodes
            if a.op == "get_attr" and isinstance(v := a.meta.get("val"), torch.Tensor)
        )
