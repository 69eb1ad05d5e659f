"""Per-node cost and role analysis over a Program's FX graph, and a networkx view of it.

Shapes in the graph are symbolic in the candidate count (and jagged lengths); ``analyze`` binds the
symbols to the sizes of a concrete batch and counts, per node: FLOPs, bytes moved, parameter bytes
read, output dtype, and the node's *role*: ``request`` (identical on every row of a request),
``candidate`` (varies per candidate) or ``param`` (no row dimension at all). Role rules are
conservative: an op not known to keep rows independent is candidate-level.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
from collections.abc import Iterable
from typing import Any

import networkx as nx
import sympy
import torch
import torch.fx

import codesign.ops  # noqa: F401  (custom ops the analysis knows the cost of)
from codesign.ir.program import REQUEST_OFFSETS, Program
from codesign.ir.request import RequestBatch, even_counts, flatten_inputs

__all__ = [
    "FLOPS_PER_ELEMENT",
    "NodeCost",
    "ProgramAnalysis",
    "Role",
    "analyze",
    "count_kernels",
    "embedding_id_bounds",
    "propagate_roles",
    "to_networkx",
]

aten = torch.ops.aten


class Role(str, enum.Enum):
    REQUEST = "request"
    CANDIDATE = "candidate"
    PARAM = "param"


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """Cost of one graph node at a concrete batch size."""

    name: str
    op: str
    flops: int
    bytes: int
    param_bytes: int
    dtype: str
    role: Role
    is_view: bool
    module: str
    out_shape: tuple[int, ...]

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf


@dataclasses.dataclass
class ProgramAnalysis:
    """All node costs of a Program for ``candidates`` rows spread over ``requests`` requests."""

    nodes: list[NodeCost]
    candidates: int
    requests: int
    param_bytes: int

    @property
    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def total_bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    @property
    def kernels(self) -> list[NodeCost]:
        """Nodes that launch work (views and bookkeeping excluded)."""
        return [n for n in self.nodes if not n.is_view]

    def flops_by_role(self) -> dict[Role, int]:
        out = dict.fromkeys(Role, 0)
        for n in self.nodes:
            out[n.role] += n.flops
        return out

    def flops_per_candidate(self) -> float:
        return self.total_flops / max(1, self.candidates)


# ---- op tables --------------------------------------------------------------------------------

_VIEW_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.expand.default,
    aten.expand_as.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.alias.default,
    aten.detach.default,
    aten.unflatten.int,
    aten.flatten.using_ints,
    aten.split.Tensor,
    aten.chunk.default,
    aten.unbind.int,
    aten.split_with_sizes.default,
    aten.narrow.default,
    aten.as_strided.default,
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten._assert_tensor_metadata.default,
    aten.lift_fresh_copy.default,
    operator.getitem,
}
# Passes over ids/offsets a grouped EmbeddingBag lookup makes before its gather (codesign.ops).
GROUPED_ID_PASSES = 10
# Ops whose cost per output element is above one FLOP (transcendentals, normalizations).
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
_MOVE_ONLY = {
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
}
_REDUCTIONS = {
    aten.sum.dim_IntList,
    aten.mean.dim,
    aten.amax.default,
    aten.amin.default,
    aten.sum.default,
    aten.mean.default,
    aten.max.dim,
    aten.min.dim,
}

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


# ---- shapes -----------------------------------------------------------------------------------


def symbolic_dim(d: Any) -> Any:
    """The sympy expression of a (possibly symbolic) size: compare dims across nodes with ``==``."""
    return d.node.expr if isinstance(d, torch.SymInt) else d


def _symbol_env(program: Program, batch: RequestBatch) -> dict[Any, int]:
    env: dict[Any, int] = {}
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


class _Shapes:
    """Concrete shapes of node values under a symbol binding."""

    def __init__(self, env: dict[Any, int], fallback: int) -> None:
        self.env = env
        self.fallback = fallback

    def dim(self, d: Any) -> int:
        if isinstance(d, int):
            return d
        e = symbolic_dim(d)
        if not isinstance(e, sympy.Basic) or isinstance(e, sympy.Integer):
            return int(e)
        value = e.xreplace(self.env)
        if not isinstance(value, sympy.Basic):
            return int(value)
        if value.free_symbols:  # unbacked (data-dependent) size: assume one per candidate row
            value = value.xreplace(dict.fromkeys(value.free_symbols, self.fallback))
        return int(value)  # type: ignore[arg-type]

    def shape(self, val: Any) -> tuple[int, ...]:
        return tuple(self.dim(d) for d in val.shape)

    def numel(self, val: Any) -> int:
        return math.prod(self.shape(val))

    def nbytes(self, val: Any) -> int:
        return self.numel(val) * val.dtype.itemsize


def _tensor_vals(obj: Any) -> list[Any]:
    vals: list[Any] = []
    if isinstance(obj, torch.fx.Node):
        v = obj.meta.get("val")
        if isinstance(v, torch.Tensor):
            vals.append(v)
        elif isinstance(v, list | tuple):
            vals += [t for t in v if isinstance(t, torch.Tensor)]
    elif isinstance(obj, list | tuple):
        for o in obj:
            vals += _tensor_vals(o)
    return vals


def _matmul_flops(node: torch.fx.Node, s: _Shapes) -> int | None:
    t = node.target
    out = node.meta.get("val")
    if t is aten.linear.default:
        x, w = node.args[0], node.args[1]
        m = s.numel(x.meta["val"]) // s.dim(x.meta["val"].shape[-1])  # type: ignore[union-attr]
        n_out, k = s.shape(w.meta["val"])  # type: ignore[union-attr]
        bias = len(node.args) > 2 and node.args[2] is not None
        return 2 * m * k * n_out + (m * n_out if bias else 0)
    if t in (
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.matmul.default,
    ):
        a = node.args[1] if t in (aten.addmm.default, aten.baddbmm.default) else node.args[0]
        k = s.dim(a.meta["val"].shape[-1])  # type: ignore[union-attr]
        extra = s.numel(out) if t in (aten.addmm.default, aten.baddbmm.default) else 0
        return 2 * s.numel(out) * k + extra
    if t in (torch.ops.codesign.broadcast_linear.default, torch.ops.codesign.fused_linear.default):
        x, w = node.args[0], node.args[1]
        m = s.numel(x.meta["val"]) // s.dim(x.meta["val"].shape[-1])  # type: ignore[union-attr]
        n_out, k = s.shape(w.meta["val"])  # type: ignore[union-attr]
        return 2 * m * k * n_out + 2 * m * n_out  # GEMM + two epilogue terms (row or activation, bias)
    if t is aten.scaled_dot_product_attention.default:
        q, k_, v = (a.meta["val"] for a in node.args[:3])  # type: ignore[union-attr]
        qs, ks, vs = s.shape(q), s.shape(k_), s.shape(v)
        batch = math.prod(qs[:-2])
        scores = batch * qs[-2] * ks[-2]
        return 2 * scores * qs[-1] + 2 * scores * vs[-1] + 5 * scores
    return None


def _node_cost(node: torch.fx.Node, s: _Shapes, param_nodes: set[str]) -> tuple[int, int, int, bool]:
    """(flops, bytes, param_bytes, is_view) of one call_function node."""
    t = node.target
    in_vals = _tensor_vals(list(node.args) + list(node.kwargs.values()))
    out_vals = _tensor_vals(node)
    param_bytes = sum(
        s.nbytes(a.meta["val"])
        for a in node.all_input_nodes
        if a.name in param_nodes and isinstance(a.meta.get("val"), torch.Tensor)
    )
    if t in _VIEW_OPS or isinstance(node.meta.get("val"), int | torch.SymInt | torch.SymBool):
        return 0, 0, 0, True  # views and shape arithmetic (sizes, not tensors) launch no kernel
    out_bytes = sum(s.nbytes(v) for v in out_vals)
    if t is aten.embedding.default:
        idx = node.args[1].meta["val"]  # type: ignore[union-attr]
        return 0, s.nbytes(idx) + 2 * out_bytes, 0, False
    if t in (aten.embedding_bag.padding_idx, aten.embedding_bag.default, aten._embedding_bag.default):
        weight, idx = (a.meta["val"] for a in node.args[:2])  # type: ignore[union-attr]
        dim = s.dim(weight.shape[-1])
        looked_up = s.numel(idx) * dim
        offsets = node.args[2].meta["val"] if isinstance(node.args[2], torch.fx.Node) else None
        meta = s.nbytes(idx) + (s.nbytes(offsets) if offsets is not None else 0)
        main_out = s.nbytes(out_vals[0]) if out_vals else 0
        return looked_up, meta + looked_up * weight.dtype.itemsize + main_out, 0, False
    if t is torch.ops.codesign.grouped_embedding_bag.default:
        weight = node.args[0].meta["val"]  # type: ignore[union-attr]
        dim = s.dim(weight.shape[-1])
        ids = sum(s.numel(v) for v in _tensor_vals(node.args[1]))
        meta = sum(s.nbytes(v) for v in _tensor_vals(list(node.args[1:3])))
        looked_up = ids * dim
        # before the gather, ids and offsets are concatenated, shifted into the joint table and
        # bounds-checked per table: about GROUPED_ID_PASSES reads/writes of every id and offset
        prep = GROUPED_ID_PASSES * meta
        return looked_up, prep + looked_up * weight.dtype.itemsize + out_bytes, 0, False
    if t in (
        torch.ops.codesign.quantized_embedding.default,
        torch.ops.codesign.quantized_embedding_bag.default,
    ):
        weight, _, idx = (a.meta["val"] for a in node.args[:3])  # type: ignore[union-attr]
        rows = s.numel(idx)
        looked_up = rows * s.dim(weight.shape[-1])
        meta = sum(s.nbytes(v) for v in _tensor_vals(list(node.args[2:4])))
        # one byte per value and a 4-byte scale per gathered row; dequantizing is one multiply each
        return looked_up, meta + looked_up * weight.dtype.itemsize + 4 * rows + out_bytes, 0, False
    in_bytes = sum(s.nbytes(v) for v in in_vals)
    if t is torch.ops.codesign.fp8_linear.default:
        x, w = node.args[0].meta["val"], node.args[1].meta["val"]  # type: ignore[union-attr]
        m, (n_out, k) = s.numel(x) // s.dim(x.shape[-1]), s.shape(w)
        # the activation is quantized first: read it, write one byte per value, read that back
        quant = s.nbytes(x) + 2 * m * k
        return 2 * m * k * n_out + 2 * m * n_out, in_bytes + quant + out_bytes, param_bytes, False
    flops = _matmul_flops(node, s)
    if flops is None:
        if t in _MOVE_ONLY:
            flops = 0
        elif t in _REDUCTIONS:
            flops = sum(s.numel(v) for v in in_vals[:1])
        else:
            flops = FLOPS_PER_ELEMENT.get(t, 1) * sum(s.numel(v) for v in out_vals)
    return flops, in_bytes + out_bytes, param_bytes, False


def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return str(path)


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    name = getattr(t, "__name__", None) or str(t)
    return str(name).removeprefix("aten.")


def _param_node_names(program: Program) -> set[str]:
    return {n.name for n in program.graph.nodes if n.op == "get_attr"}


# ---- roles ------------------------------------------------------------------------------------


def _as_int(value: Any) -> int:
    """An FX argument known to be an int (dims, indices); SymInts are not expected here."""
    return int(value)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _keeps_rows(node: torch.fx.Node) -> bool:
    """True when output row i depends only on input rows i (dim 0 untouched)."""
    t = node.target
    if t in _DIM_ARG:
        pos = _DIM_ARG[t]
        args = list(node.args)
        dim = args[pos] if len(args) > pos else node.kwargs.get("dim", 0)
        first = args[0]
        if isinstance(first, list | tuple):
            first = first[0]
        val = first.meta.get("val") if isinstance(first, torch.fx.Node) else None
        rank = val.dim() if isinstance(val, torch.Tensor) else 1
        if t is aten.transpose.int:
            return 0 not in (_norm_dim(_as_int(args[1]), rank), _norm_dim(_as_int(args[2]), rank))  # type: ignore[call-overload]
        if t is aten.unsqueeze.default:
            rank += 1
        if isinstance(dim, list | tuple):
            return all(_norm_dim(_as_int(d), rank) != 0 for d in dim)
        return _norm_dim(_as_int(dim), rank) != 0  # type: ignore[call-overload]
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
        src, out = node.args[0].meta.get("val"), node.meta.get("val")  # type: ignore[union-attr]
        return (
            isinstance(src, torch.Tensor)
            and isinstance(out, torch.Tensor)
            and src.dim() > 0
            and out.dim() > 0
            and symbolic_dim(src.shape[0]) == symbolic_dim(out.shape[0])
        )
    if t is aten.permute.default:
        return _as_int(node.args[1][0]) == 0  # type: ignore[index, call-overload]
    if t is aten.index.Tensor:
        return bool(node.args[1]) and node.args[1][0] is None  # type: ignore[index]
    if t in (aten.mm.default, aten.addmm.default):
        b = node.args[-1]
        return isinstance(b, torch.fx.Node) and b.op == "get_attr"
    return t in _ELEMENTWISE_OR_ROWWISE or t in (aten.embedding_bag.padding_idx, aten.embedding_bag.default)


def is_row_view(node: torch.fx.Node) -> bool:
    """A view op that leaves dim 0 (the candidate rows) alone: applying it before or after a row gather agrees."""
    if node.op != "call_function" or node.target not in _VIEW_OPS or node.target is operator.getitem:
        return False
    if node.target in (
        aten.sym_size.int,
        aten.sym_numel.default,
        aten.sym_stride.int,
        aten._assert_tensor_metadata.default,
        aten.split.Tensor,
        aten.chunk.default,
        aten.unbind.int,
        aten.split_with_sizes.default,
    ):
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
        if node.target is aten.sym_size.int and len(node.args) > 1 and node.args[1] != 0:
            roles[node.name] = Role.PARAM  # a size other than the row count is the same for every row
        elif node.target in (aten.slice.Tensor, aten.select.int) and node.args[0].name in request_cols:  # type: ignore[union-attr]
            roles[node.name] = _column_role(node, request_cols[node.args[0].name])  # type: ignore[union-attr]
        elif node.target in (aten.embedding_bag.padding_idx, aten.embedding_bag.default):
            # rows of the output are bags: request-level when the bag ids are request-level
            roles[node.name] = (
                Role.REQUEST if roles.get(node.args[1].name) is Role.REQUEST else Role.CANDIDATE
            )  # type: ignore[union-attr]
        elif all(r is Role.PARAM for r in ins):
            roles[node.name] = Role.PARAM
        elif Role.CANDIDATE in ins or not _keeps_rows(node):
            roles[node.name] = Role.CANDIDATE
        else:
            roles[node.name] = Role.REQUEST
    return roles


def _column_role(node: torch.fx.Node, ranges: Iterable[tuple[int, int]]) -> Role:
    args = list(node.args)
    dim = _as_int(args[1]) if len(args) > 1 else 0  # type: ignore[call-overload]
    if dim != 1:
        return Role.CANDIDATE
    if node.target is aten.select.int:
        lo, hi = _as_int(args[2]), _as_int(args[2]) + 1  # type: ignore[call-overload]
    else:
        lo = _as_int(args[2]) if len(args) > 2 and args[2] is not None else 0  # type: ignore[call-overload]
        out = node.meta["val"]
        hi = lo + int(out.shape[1])
    return Role.REQUEST if any(a <= lo and hi <= b for a, b in ranges) else Role.CANDIDATE


# ---- entry points -----------------------------------------------------------------------------


def analyze(
    program: Program, candidates: int | RequestBatch = 64, requests: int = 1, *, seed: int = 0
) -> ProgramAnalysis:
    """Per-node FLOPs, bytes, parameter bytes and role at a concrete batch size.

    ``candidates`` is a total candidate count (split evenly over ``requests``) or a batch whose
    sizes bind the graph's symbolic dimensions.
    """
    if isinstance(candidates, RequestBatch):
        batch = candidates
    else:
        if candidates < requests or requests < 1:
            raise ValueError(f"need candidates >= requests >= 1, got {candidates=} {requests=}")
        batch = program.sample_batch(even_counts(candidates, requests), seed)
    shapes = _Shapes(_symbol_env(program, batch), fallback=batch.num_candidates)
    roles = propagate_roles(program)
    params = _param_node_names(program)
    nodes: list[NodeCost] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        flops, nbytes, pbytes, is_view = _node_cost(node, shapes, params)
        val = node.meta.get("val")
        first = val if isinstance(val, torch.Tensor) else next(iter(_tensor_vals(node)), None)
        nodes.append(
            NodeCost(
                name=node.name,
                op=_op_name(node),
                flops=int(flops),
                bytes=int(nbytes),
                param_bytes=int(pbytes),
                dtype=str(first.dtype).removeprefix("torch.") if first is not None else "-",
                role=roles.get(node.name, Role.CANDIDATE),
                is_view=is_view,
                module=_module_of(node),
                out_shape=shapes.shape(first) if first is not None else (),
            )
        )
    seen: set[int] = set()
    param_bytes = 0
    for t in list(program.graph_module.parameters()) + list(program.graph_module.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            param_bytes += t.untyped_storage().nbytes()  # views (e.g. unpacked index pairs) share storage
    return ProgramAnalysis(nodes, batch.num_candidates, batch.num_requests, param_bytes)


def count_kernels(program: Program) -> int:
    """Ops that launch work: call_function nodes other than views and shape bookkeeping."""
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target not in _VIEW_OPS)


def to_networkx(program: Program, analysis: ProgramAnalysis | None = None) -> nx.DiGraph:
    """The graph as a networkx DiGraph (node attributes: op, role and, with an analysis, costs)."""
    costs = {n.name: n for n in analysis.nodes} if analysis else {}
    roles = propagate_roles(program)
    g = nx.DiGraph()
    for node in program.graph.nodes:
        attrs: dict[str, Any] = {
            "op": node.op,
            "target": _op_name(node) if node.op == "call_function" else str(node.target),
            "role": roles.get(node.name, Role.CANDIDATE).value,
        }
        if node.name in costs:
            c = costs[node.name]
            attrs.update(flops=c.flops, bytes=c.bytes, param_bytes=c.param_bytes, is_view=c.is_view)
        g.add_node(node.name, **attrs)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


# Ops that pass ids through unchanged (up to layout), so a bound on their output bounds their input.
_ID_VIEWS = {
    aten.reshape.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.contiguous.default,
    aten.clone.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.slice.Tensor,
    aten.expand.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.alias.default,
}
_LOOKUPS = {
    aten.embedding.default: 1,  # (weight, indices)
    aten.embedding_bag.default: 1,
    aten.embedding_bag.padding_idx: 1,
    aten._embedding_bag.default: 1,
    aten._embedding_bag_forward_only.default: 1,
}


def embedding_id_bounds(program: Program) -> dict[str, dict[str, int]]:
    """Input path -> {column: table rows} for integer inputs that index an embedding table directly.

    ``column`` is ``"*"`` when the whole input indexes one table, or the column number when the
    model reads column ``i`` of a 2-D id input (``x[:, i]``) into table ``i``. Ids outside
    ``[0, rows)`` would crash the lookup or read garbage; a server checks them before batching.
    Inputs that reach a table through arithmetic (hashing, offsets) are not bounded here.
    """
    inputs = {node.name: path for path, node in program.placeholders().items()}
    bounds: dict[str, dict[str, int]] = {}
    for node in program.graph.nodes:
        pos = _LOOKUPS.get(node.target) if node.op == "call_function" else None
        if pos is None or len(node.args) <= pos:
            continue
        weight, ids = node.args[0], node.args[pos]
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            continue
        rows = int(program.fetch_attr(str(weight.target)).shape[0])
        column = "*"
        while isinstance(ids, torch.fx.Node) and ids.op == "call_function":
            if ids.target is aten.select.int and _as_int(ids.args[1]) == 1 and column == "*":
                column = str(_as_int(ids.args[2]))
            elif ids.target not in _ID_VIEWS:
                break
            ids = ids.args[0]
        if isinstance(ids, torch.fx.Node) and ids.op == "placeholder" and ids.name in inputs:
            per = bounds.setdefault(inputs[ids.name], {})
            per[column] = min(rows, per.get(column, rows))
    return bounds
