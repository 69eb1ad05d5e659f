"""The op-cost registry: one FLOPs/bytes formula per op, read by every estimate in codesign.

A formula maps an FX node and the concrete shapes of one batch to an ``OpCost``. aten formulas are
registered here; each custom op registers its own next to its ``torch.library`` definition
(``codesign/ops/<op>.py``), so defining an op and saying what it costs happen in one place and the
analysis never has to import the ops layer. ``analyze`` (and through it the cost model, the passes'
gates and the report) reads costs only through ``cost_of``.

Ops with no registered formula get the documented default (``default_cost``): one kernel that
reads its inputs and writes its outputs once and does ``FLOPS_PER_ELEMENT[op]`` (else 1) FLOPs per
output element: right for elementwise ops, the bulk of unregistered ones. Views and shape
arithmetic are free whatever is registered.

>>> @register_cost(torch.ops.mylib.scale.default)
... def _scale_cost(node, shapes):
...     return OpCost(flops=shapes.total_numel(node), bytes=io_bytes(node, shapes))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, overload

import torch
import torch.fx

from codesign.analysis.graph_queries import VIEW_OPS, tensor_arg, tensor_values
from codesign.analysis.shapes import ConcreteShapes

__all__ = [
    "FLOPS_PER_ELEMENT",
    "CostFn",
    "Engine",
    "OpCost",
    "cost_of",
    "default_cost",
    "gemm_flops",
    "io_bytes",
    "linear_cost",
    "linear_epilogue_cost",
    "linear_flops",
    "register_cost",
    "registered_cost",
]

aten = torch.ops.aten

# Which units run an op's FLOPs: tensor cores at the output dtype's rate, tensor cores at the FP8
# rate (whatever the output dtype), or the vector units.
Engine = Literal["vector", "matmul", "fp8"]


@dataclasses.dataclass(frozen=True)
class OpCost:
    """What one node costs at one batch size.

    ``bytes`` is all memory traffic, parameter reads included; ``param_bytes`` the part of it that
    reads parameters whole (a GEMM's weight). Lookups that read only some rows of a table count
    those rows in ``bytes`` and leave ``param_bytes`` at 0. ``kernels`` is how many launches one
    call makes (FP8 Linear quantizes its activation first: 2).
    """

    flops: int
    bytes: int
    param_bytes: int = 0
    engine: Engine = "vector"
    kernels: int = 1
    is_view: bool = False


CostFn = Callable[[torch.fx.Node, ConcreteShapes], OpCost]

_REGISTRY: dict[object, CostFn] = {}
_VIEW_COST = OpCost(flops=0, bytes=0, kernels=0, is_view=True)

# Ops whose cost per output element is above one FLOP (transcendentals, normalizations), for the
# default formula; ``codesign.hardware.target`` reads it to calibrate the host's vector rate.
FLOPS_PER_ELEMENT: dict[Any, int] = {
    aten.sigmoid.default: 4,
    aten.tanh.default: 4,
    aten.gelu.default: 8,
    aten.exp.default: 4,
    aten.log.default: 4,
    aten.softmax.int: 5,
    aten._softmax.default: 5,
    aten.log_softmax.int: 5,
    aten.layer_norm.default: 8,
    aten.native_layer_norm.default: 8,
    aten.rsqrt.default: 2,
    aten.silu.default: 5,
    aten.prelu.default: 2,
}


@overload
def register_cost(op: object, fn: CostFn, *, replace: bool = False) -> CostFn: ...
@overload
def register_cost(op: object, fn: None = None, *, replace: bool = False) -> Callable[[CostFn], CostFn]: ...
def register_cost(
    op: object, fn: CostFn | None = None, *, replace: bool = False
) -> CostFn | Callable[[CostFn], CostFn]:
    """Register ``fn`` as the cost formula of ``op``; also usable as a decorator.

    ``op`` is an ``OpOverload`` (``torch.ops.aten.mm.default``), an ``OpOverloadPacket``
    (``torch.ops.aten.mm``: every overload without one of its own) or any other FX call target.
    A second formula for the same op is an error unless ``replace=True``: one op, one formula.
    """

    def add(f: CostFn) -> CostFn:
        if op in _REGISTRY and not replace and _REGISTRY[op] is not f:
            raise ValueError(
                f"a cost formula for {op} is already registered ({_REGISTRY[op].__qualname__}); "
                "pass replace=True to override it"
            )
        _REGISTRY[op] = f
        return f

    return add if fn is None else add(fn)


def registered_cost(target: object) -> CostFn | None:
    """The formula registered for an FX call target (its overload, else its packet), or None."""
    fn = _REGISTRY.get(target)
    if fn is None and isinstance(target, torch._ops.OpOverload):
        fn = _REGISTRY.get(target.overloadpacket)
    return fn


def cost_of(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """Cost of one ``call_function`` node: free for views, else its registered formula or the default."""
    if node.target in VIEW_OPS or isinstance(node.meta.get("val"), int | torch.SymInt | torch.SymBool):
        return _VIEW_COST  # views and shape arithmetic (sizes, not tensors) launch no kernel
    fn = registered_cost(node.target)
    return fn(node, shapes) if fn is not None else default_cost(node, shapes)


# ---- shared pieces of formulas ------------------------------------------------------------------


def gemm_flops(m: int, k: int, n: int) -> int:
    """Multiply-adds of an [m, k] x [k, n] product, two FLOPs each (torch's FlopCounterMode agrees)."""
    return 2 * m * k * n


def io_bytes(node: torch.fx.Node, shapes: ConcreteShapes) -> int:
    """Every tensor argument read once and every output written once."""
    return shapes.total_bytes([*node.args, *node.kwargs.values()]) + shapes.total_bytes(node)


def default_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """An unregistered op: elementwise, ``FLOPS_PER_ELEMENT`` (default 1) FLOPs per output element."""
    flops = FLOPS_PER_ELEMENT.get(node.target, 1) * shapes.total_numel(node)
    return OpCost(flops, io_bytes(node, shapes), shapes.param_bytes(node))


# ---- aten formulas ------------------------------------------------------------------------------


def _move_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """Copies, concatenations, gathers and fills: memory traffic only."""
    return OpCost(0, io_bytes(node, shapes), shapes.param_bytes(node))


def _reduction_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """One FLOP per element of the reduced input."""
    first = tensor_values([*node.args, *node.kwargs.values()])[:1]
    return OpCost(sum(shapes.numel(v) for v in first), io_bytes(node, shapes), shapes.param_bytes(node))


def _gemm_cost(node: torch.fx.Node, shapes: ConcreteShapes, flops: int) -> OpCost:
    return OpCost(flops, io_bytes(node, shapes), shapes.param_bytes(node), engine="matmul")


def linear_flops(m: int, k: int, n_out: int, bias: bool) -> int:
    """``x @ w.T (+ b)`` over m rows: a GEMM plus one add per output for the bias."""
    return gemm_flops(m, k, n_out) + (m * n_out if bias else 0)


def linear_cost(m: int, k: int, n_out: int, itemsize: int, bias: bool) -> OpCost:
    """A Linear over m rows with every tensor in one dtype: read x, weight (and bias) once, write y.

    For asking what a layer would cost in another precision (the FP8 pass's bf16 baseline); a graph
    node is priced from its own tensors' dtypes by the registered formula below.
    """
    params = (k * n_out + (n_out if bias else 0)) * itemsize
    return OpCost(
        linear_flops(m, k, n_out, bias), (m * k + m * n_out) * itemsize + params, params, engine="matmul"
    )


def linear_epilogue_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """A Linear-shaped GEMM (``x[..., K]``, ``w[N, K]``) plus two epilogue terms per output; inputs read once.

    The cost of codesign's fused GEMMs: bias + activation (``fused_linear``), bias + the request's row
    (``broadcast_linear``).
    """
    x, w = tensor_arg(node, 0), tensor_arg(node, 1)
    m, (n_out, k) = shapes.rows(x), shapes.shape(w)
    return _gemm_cost(node, shapes, gemm_flops(m, k, n_out) + 2 * m * n_out)


def _linear_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """``x @ w.T (+ b)``: a GEMM over every row of x, plus one add per output for the bias."""
    x, w = tensor_arg(node, 0), tensor_arg(node, 1)
    m, (n_out, k) = shapes.rows(x), shapes.shape(w)
    bias = len(node.args) > 2 and node.args[2] is not None
    return _gemm_cost(node, shapes, linear_flops(m, k, n_out, bias))


def _product_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """mm / bmm / matmul: two FLOPs per output element per reduced element."""
    out, a = tensor_values(node)[0], tensor_arg(node, 0)
    return _gemm_cost(node, shapes, 2 * shapes.numel(out) * shapes.dim(a.shape[-1]))


def _tensordot_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """``tensordot(a, b, dims_a, dims_b)``: two FLOPs per output element per contracted element."""
    out, a = tensor_values(node)[0], tensor_arg(node, 0)
    dims = node.args[2] if len(node.args) > 2 else []
    size = shapes.shape(a)
    reduced = math.prod(size[int(d)] for d in dims) if isinstance(dims, list | tuple) else 1
    return _gemm_cost(node, shapes, 2 * shapes.numel(out) * reduced)


def _einsum_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """``einsum``: one multiply-add per point of the full index space (every letter), two FLOPs each when
    letters are summed away; one FLOP per output element for a pure outer/element-wise product."""
    equation, operands = node.args[0], node.args[1] if len(node.args) > 1 else []
    out = tensor_values(node)[0]
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        return default_cost(node, shapes)
    ins, result = equation.replace(" ", "").split("->")
    sizes: dict[str, int] = {}
    for spec, op in zip(ins.split(","), tensor_values(operands), strict=False):
        sizes.update(zip(spec, shapes.shape(op), strict=False))
    points = math.prod(sizes.values())
    contracted = any(letter not in result for letter in sizes)
    flops = 2 * points if contracted else shapes.numel(out)
    return (
        _gemm_cost(node, shapes, flops)
        if contracted
        else OpCost(flops, io_bytes(node, shapes), shapes.param_bytes(node))
    )


def _conv1d_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """``conv1d``: two FLOPs per output element per (input channel / groups) x kernel width."""
    out, w = tensor_values(node)[0], tensor_arg(node, 1)
    _, per_group, width = shapes.shape(w)
    return _gemm_cost(node, shapes, 2 * shapes.numel(out) * per_group * width)


def _product_plus_input_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """addmm / baddbmm (``c + a @ b``): the product plus one add per output element."""
    out, a = tensor_values(node)[0], tensor_arg(node, 1)
    n = shapes.numel(out)
    return _gemm_cost(node, shapes, 2 * n * shapes.dim(a.shape[-1]) + n)


def _attention_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """``softmax(q k^T) v``: two products over the score matrix, five FLOPs per score for the softmax."""
    qs, ks, vs = (shapes.shape(tensor_arg(node, i)) for i in range(3))
    scores = math.prod(qs[:-2]) * qs[-2] * ks[-2]
    return _gemm_cost(node, shapes, 2 * scores * qs[-1] + 2 * scores * vs[-1] + 5 * scores)


def _embedding_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """A row gather: read the ids, read each gathered row and write it (no arithmetic)."""
    out_bytes = shapes.total_bytes(node)
    return OpCost(0, shapes.nbytes(tensor_arg(node, 1)) + 2 * out_bytes)


def _embedding_bag_cost(node: torch.fx.Node, shapes: ConcreteShapes) -> OpCost:
    """Gather and pool: one FLOP per looked-up value; read ids, offsets and the rows, write the bags."""
    weight, idx = tensor_arg(node, 0), tensor_arg(node, 1)
    looked_up = shapes.numel(idx) * shapes.dim(weight.shape[-1])
    meta = shapes.nbytes(idx) + shapes.total_bytes(node.args[2])
    outs = tensor_values(node)
    main_out = shapes.nbytes(outs[0]) if outs else 0  # the bag sums; the other outputs are bookkeeping
    return OpCost(looked_up, meta + looked_up * weight.dtype.itemsize + main_out)


for _op in (
    aten.cat.default,
    aten.stack.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.arange.start_step,
    aten.arange.default,
    aten.zeros.default,
    aten.ones.default,
    aten.full.default,
    aten.index.Tensor,
    aten.index_select.default,
    aten.gather.default,
    aten.copy.default,
):
    register_cost(_op, _move_cost)
for _op in (
    aten.sum.dim_IntList,
    aten.mean.dim,
    aten.amax.default,
    aten.amin.default,
    aten.sum.default,
    aten.mean.default,
    aten.max.dim,
    aten.min.dim,
):
    register_cost(_op, _reduction_cost)
for _op in (aten.mm.default, aten.bmm.default, aten.matmul.default):
    register_cost(_op, _product_cost)
for _op in (aten.addmm.default, aten.baddbmm.default):
    register_cost(_op, _product_plus_input_cost)
for _op in (aten.embedding_bag.padding_idx, aten.embedding_bag.default, aten._embedding_bag.default):
    register_cost(_op, _embedding_bag_cost)
register_cost(aten.linear.default, _linear_cost)
register_cost(aten.tensordot.default, _tensordot_cost)
register_cost(aten.einsum.default, _einsum_cost)
register_cost(aten.conv1d.default, _conv1d_cost)
register_cost(aten.scaled_dot_product_attention.default, _attention_cost)
register_cost(aten.embedding.default, _embedding_cost)
