"""Request-centric computation: user work once per request, shared by all of its candidates.

Flat ranking models repeat the user's features on every candidate row, so the user tower runs N
times for one user. This pass uses the roles from ``codesign.analysis.propagate_roles``:

* the program gains an input ``request_offsets`` (R+1 entries, as in ``RequestBatch.offsets``);
* every request-level *source* (a request-level input, a request-column slice, a lookup over
  request-level ids) is compressed to one row per request: ``index_select(x, 0, offsets[:-1])``;
* request-level nodes that depend only on compressed values and parameters are recomputed on the
  R compressed rows instead of N;
* where a request-level value meets candidate-level work, it is expanded back with
  ``index_select(v, 0, request_index)``, ``request_index = searchsorted(offsets[1:], arange(N), right)``.

Numerics are unchanged up to fp32 rounding (the same ops run on fewer rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

import codesign.ops  # noqa: F401  (registers codesign::broadcast_linear, the op this pass rewrites to)
from codesign.analysis import Role, analyze, is_row_view, node_value, propagate_roles, symbolic_dim
from codesign.config import Config, knob, register_config
from codesign.hardware.costmodel import estimate_analysis
from codesign.hardware.target import Target
from codesign.ir.program import REQUEST_OFFSETS, Program
from codesign.passes.graph_edit import dynamic_placeholder_value, list_arg, propagate_meta
from codesign.passes.manager import (
    GAIN_HELP,
    GATE_CANDIDATES,
    GATE_REQUESTS,
    Pass,
    PassResult,
    SkipKind,
    SkipReason,
)
from codesign.passes.patterns import epilogue_activation
from codesign.passes.registry import register_pass

__all__ = ["RequestSharing", "RequestSharingConfig"]

aten = torch.ops.aten

# A real run at this size counts executed FLOPs (kept small: the original program runs it naively).
MEASURE_CANDIDATES = 64
MEASURE_REQUESTS = 4


@register_config
@dataclasses.dataclass(frozen=True)
class RequestSharingConfig(Config):
    min_request_fraction: float = knob(
        0.0,
        low=0.0,
        high=1.0,
        step=0.05,
        help="skip the rewrite when request-level FLOPs are below this share of the total",
    )
    # Linear(concat(user, cand)) -> W_u·u + W_c·c; user x user dot products
    split_concat_linears: bool = knob(True, help="split Linear over concat(user, candidate) features")
    fuse_broadcast: bool = knob(True, help="fuse the per-request row gather into the candidate GEMM")
    require_predicted_gain: bool = knob(True, help=GAIN_HELP)


@register_pass
class RequestSharing(Pass[RequestSharingConfig]):
    """Compute request-level work on one row per request; gather it back where candidates need it."""

    name = "request_sharing"
    config_class = RequestSharingConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        if program.takes_request_offsets:
            return PassResult.skipped(
                program, SkipKind.ALREADY_APPLIED, "the program is already request-centric"
            )
        cfg = self.config
        before = analyze(program, GATE_CANDIDATES, GATE_REQUESTS)
        # algebraic splits trade FLOPs for extra ops and copies: try them, keep what the cost model prefers
        splits = cfg.split_concat_linears
        plans = list(dict.fromkeys([(splits, splits), (splits, False), (False, False)]))
        built: list[tuple[float, Program, dict[str, Any]]] = []
        skip = SkipReason(SkipKind.NOT_APPLICABLE, "no request-level work")
        found: tuple[int, int] | None = None  # splits the fullest plan found; later plans skip repeats of it
        seen: set[tuple[bool, bool]] = set()
        for linears, pairwise in plans:
            if found is not None:
                effective = (linears and found[0] > 0, pairwise and found[1] > 0)
                if effective in seen:
                    continue  # would rebuild a rewrite already built (the split found nothing to split)
            result = _build(
                program,
                linears=linears,
                pairwise=pairwise,
                fuse=cfg.fuse_broadcast,
                min_fraction=cfg.min_request_fraction,
            )
            if isinstance(result, SkipReason):
                skip = result
                continue
            out, stats = result
            n_linears, n_pairwise = stats["linears_split"], stats["pairwise_interactions_split"]
            found = found or (n_linears, n_pairwise)
            seen.add((n_linears > 0, n_pairwise > 0))
            after = analyze(out, GATE_CANDIDATES, GATE_REQUESTS)
            stats["flops_after"] = after.total_flops
            built.append((estimate_analysis(after, target).latency_s, out, stats))
        if not built:
            return PassResult(program, False, {}, skip)
        _, out, stats = min(built, key=lambda b: b[0])
        stats.update(
            {
                "flops_before": before.total_flops,
                "flops_moved_to_request_level": before.total_flops - stats["flops_after"],
                "at": f"{GATE_CANDIDATES} candidates / {GATE_REQUESTS} requests",
                "measured_matmul_flops_before": _measured_matmul_flops(program),
                "measured_matmul_flops_after": _measured_matmul_flops(out),
                "measured_at": f"{MEASURE_CANDIDATES} candidates / {MEASURE_REQUESTS} requests",
            }
        )
        return PassResult(out, True, stats)


def _build(
    program: Program, *, linears: bool, pairwise: bool, fuse: bool, min_fraction: float
) -> tuple[Program, dict[str, Any]] | SkipReason:
    """One request-centric rewrite of ``program``, or why there is nothing to share."""
    work = program.shallow_copy()
    known = set(work.graph.nodes)
    n_linears = _split_concat_linears(work) if linears else 0
    n_pairwise = _split_pairwise_interactions(work) if pairwise else 0
    if n_linears or n_pairwise:
        work.recompile()
        propagate_meta(work, [n for n in work.graph.nodes if n not in known])  # before roles are recomputed
        known = set(work.graph.nodes)
    split_analysis = analyze(work, GATE_CANDIDATES, GATE_REQUESTS)
    request_flops = split_analysis.flops_by_role()[Role.REQUEST]
    fraction = request_flops / max(1, split_analysis.total_flops)
    if request_flops == 0:
        return SkipReason(
            SkipKind.NOT_APPLICABLE,
            "no request-level work",
            fix="declare the user inputs or columns request-level in the RequestSpec",
        )
    if fraction < min_fraction:
        return SkipReason(
            SkipKind.BELOW_THRESHOLD,
            f"request-level FLOPs {fraction:.1%} < min_request_fraction {min_fraction:.1%}",
            fix="lower min_request_fraction",
        )
    compressed, expanded, request_index = _rewrite(work)
    if compressed == 0:
        return SkipReason(SkipKind.NOT_APPLICABLE, "request-level values feed no shareable op")
    fused = _fuse_broadcast_linear(work, request_index) if fuse else 0
    work.takes_request_offsets = True
    work.recompile()
    stats: dict[str, Any] = {
        "nodes_shared": compressed,
        "expansions": expanded,
        "linears_split": n_linears,
        "pairwise_interactions_split": n_pairwise,
        "broadcast_linears": fused,
        "request_flops_fraction": round(fraction, 4),
    }
    propagate_meta(work, [n for n in work.graph.nodes if n not in known])  # shared nodes now have R rows
    return work, stats


def _measured_matmul_flops(program: Program) -> int:
    """Matmul/attention FLOPs counted by torch's FlopCounterMode while really running the program."""
    counts = [MEASURE_CANDIDATES // MEASURE_REQUESTS] * MEASURE_REQUESTS
    batch = program.sample_batch(counts, seed=4242)
    with FlopCounterMode(display=False) as counter:
        program.run(batch)
    return int(counter.get_total_flops())


def _int_arg(value: Any) -> int:
    """An FX argument known to be a Python int (a dim)."""
    return int(value)


def _is_matrix(node: Any) -> bool:
    val = _tensor_val(node) if isinstance(node, torch.fx.Node) else None
    return val is not None and val.dim() == 2


def _tensor_val(node: torch.fx.Node) -> torch.Tensor | None:
    """The node's tensor value when it has rows (scalars are never shared or gathered)."""
    val = node_value(node)
    return val if val is not None and val.dim() > 0 else None


@dataclasses.dataclass
class _RequestIndex:
    """The nodes every rewrite shares: the offsets input, each request's first row, and request_index[N]."""

    offsets: torch.fx.Node
    first_rows: torch.fx.Node
    request_index: torch.fx.Node
    nodes: frozenset[torch.fx.Node]


def _add_request_index(program: Program) -> _RequestIndex:
    """Add the ``request_offsets`` input and the nodes that map candidate rows to their request."""
    graph = program.graph
    last_placeholder = list(program.placeholders().values())[-1]
    row_source = _row_source(program)  # before the graph gains an input the spec does not list
    device = program.example.offsets.device
    with graph.inserting_after(last_placeholder):
        offsets = graph.placeholder(REQUEST_OFFSETS)
    offsets.meta["val"] = dynamic_placeholder_value(graph, program.example.offsets)
    with graph.inserting_after(offsets):
        first_rows = graph.call_function(aten.slice.Tensor, (offsets, 0, 0, -1))
    with graph.inserting_after(first_rows):
        ends = graph.call_function(aten.slice.Tensor, (offsets, 0, 1, 9223372036854775807))
    with graph.inserting_after(ends):
        n_rows = graph.call_function(aten.sym_size.int, (row_source, 0))
    with graph.inserting_after(n_rows):
        rows = graph.call_function(aten.arange.default, (n_rows,), {"dtype": torch.int64, "device": device})
    with graph.inserting_after(rows):
        request_index = graph.call_function(aten.searchsorted.Tensor, (ends, rows), {"right": True})
    nodes = frozenset({offsets, first_rows, ends, n_rows, rows, request_index})
    return _RequestIndex(offsets, first_rows, request_index, nodes)


def _compress(
    program: Program, index: _RequestIndex, on_rows: Callable[[Any], bool], roles: dict[str, Role]
) -> tuple[dict[torch.fx.Node, torch.fx.Node], set[torch.fx.Node]]:
    """Copy every request-level node whose inputs are request-level rows or parameters onto R rows.

    Returns (original -> its R-row value, the originals that were recomputed); a request-level *source*
    is gathered once per request with ``index_select(x, 0, first_rows)``.
    """
    graph = program.graph
    compressed: dict[torch.fx.Node, torch.fx.Node] = {}
    copied: set[torch.fx.Node] = set()

    def compressible(node: torch.fx.Node) -> bool:
        # a list value (chunk, split) can only be shared by recomputing it, never gathered
        return node in compressed or (on_rows(node) and _tensor_val(node) is not None)

    def compress(node: torch.fx.Node) -> torch.fx.Node:
        if (
            node not in compressed
        ):  # a source: keep its N rows for candidate users, gather one row per request
            with graph.inserting_after(index.request_index if node.op == "placeholder" else node):
                compressed[node] = graph.call_function(aten.index_select.default, (node, 0, index.first_rows))
            compressed[node].meta = dict(node.meta)
        return compressed[node]

    for node in list(graph.nodes):
        if node in index.nodes or node.op != "call_function" or not on_rows(node):
            continue
        inputs = node.all_input_nodes
        row_inputs = [a for a in inputs if on_rows(a)]
        if not row_inputs or not all(on_rows(a) or roles.get(a.name) is Role.PARAM for a in inputs):
            continue
        if not all(compressible(a) for a in row_inputs):
            continue
        with graph.inserting_after(node):
            new = graph.node_copy(node, lambda a: compress(a) if on_rows(a) else a)
        new.meta = dict(node.meta)
        compressed[node] = new
        copied.add(node)
    return compressed, copied


def _expand(
    graph: torch.fx.Graph,
    index: _RequestIndex,
    compressed: dict[torch.fx.Node, torch.fx.Node],
    copied: set[torch.fx.Node],
) -> int:
    """Point candidate-level users of shared nodes at N-row gathers by request_index; returns the gathers."""
    expansions: dict[torch.fx.Node, torch.fx.Node] = {}

    def expand(node: torch.fx.Node) -> torch.fx.Node:
        """N-row value of a shared node: gather its R rows by request_index.

        A row-preserving view of a shared value is replayed on the gathered base instead, so the gather
        copies contiguous rows rather than a strided view (much faster, same values).
        """
        if node in expansions:
            return expansions[node]
        base = node.args[0] if is_row_view(node) else None
        if isinstance(base, torch.fx.Node) and base in copied:
            gathered = expand(base)
            with graph.inserting_after(node):
                new = graph.node_copy(node, lambda a: gathered if a is base else a)
        else:
            with graph.inserting_after(compressed[node]):
                new = graph.call_function(
                    aten.index_select.default, (compressed[node], 0, index.request_index)
                )
        new.meta = dict(node.meta)
        expansions[node] = new
        return new

    shared_values = set(compressed.values())
    for node in list(copied):
        if _tensor_val(node) is None:
            continue  # list values reach candidates only through their (shared) getitems
        for user in list(node.users):
            if user in shared_values or user in compressed or user.op == "call_module":
                continue
            if user in expansions.values():
                continue
            user.replace_input_with(node, expand(node))
    return len(expansions)


def _rewrite(program: Program) -> tuple[int, int, torch.fx.Node]:
    """Rewrite ``program.graph`` in place; returns (nodes recomputed on R rows, expansions, request_index)."""
    roles, on_rows = propagate_roles(program), _request_rows(program)  # before the graph gains an input
    index = _add_request_index(program)
    compressed, copied = _compress(program, index, on_rows, roles)
    expanded = _expand(program.graph, index, compressed, copied)
    for node in reversed(list(program.graph.nodes)):  # the N-row originals of shared nodes are now unused
        if node in copied and not node.users:
            program.graph.erase_node(node)
    _add_offsets_to_signature(program)
    return len(copied), expanded, index.request_index


def _row_source(program: Program) -> torch.fx.Node:
    """A placeholder whose dim 0 is the candidate count."""
    placeholders = program.placeholders()
    return next(
        node for path, node in placeholders.items() if path in program.spec.candidate_dim_inputs([path])
    )


def _request_rows(program: Program) -> Callable[[Any], bool]:
    """Predicate: a request-level value whose tensors have one row per candidate (lists: every element)."""
    roles = propagate_roles(program)
    rows = symbolic_dim(_row_source(program).meta["val"].shape[0])

    def on_rows(node: Any) -> bool:
        if not isinstance(node, torch.fx.Node) or roles.get(node.name) is not Role.REQUEST:
            return False
        val = node.meta.get("val")
        vals = list(val) if isinstance(val, list | tuple) else [val]
        return bool(vals) and all(
            isinstance(v, torch.Tensor) and v.dim() > 0 and symbolic_dim(v.shape[0]) == rows for v in vals
        )

    return on_rows


def _split_concat_linears(program: Program) -> int:
    """``linear(cat([u..., c...], -1), W, b)`` -> ``linear(cat(c), W_c, b) + linear(cat(u), W_u)``.

    Only where the concat mixes request-level parts (one row per candidate) with candidate-level
    parts: the ``W_u`` product becomes request-level work that sharing then computes once per request.
    """
    graph, gm = program.graph, program.graph_module
    roles = propagate_roles(program)
    request_on_rows = _request_rows(program)
    tensors = dict(gm.named_parameters()) | dict(gm.named_buffers())

    split = 0
    for node in list(graph.nodes):
        if node.target is not aten.linear.default or len(node.args) < 2:
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if (
            not isinstance(x, torch.fx.Node)
            or x.target is not aten.cat.default
            or not isinstance(w, torch.fx.Node)
        ):
            continue
        if w.op != "get_attr" or str(w.target) not in tensors or roles.get(x.name) is not Role.CANDIDATE:
            continue
        parts = list_arg(x, 0)
        rank = x.meta["val"].dim()
        dim = _int_arg(x.args[1]) if len(x.args) > 1 else 0
        if dim % rank != rank - 1 or not all(
            isinstance(p, torch.fx.Node) and _tensor_val(p) is not None for p in parts
        ):
            continue
        is_req = [request_on_rows(p) for p in parts]
        if not any(is_req) or all(is_req):
            continue
        widths = [int(p.meta["val"].shape[-1]) for p in parts]
        starts = [sum(widths[:i]) for i in range(len(widths))]
        spans = list(zip(starts, widths, is_req, strict=True))
        req_cols = torch.cat([torch.arange(a, a + wd) for a, wd, r in spans if r])
        cand_cols = torch.cat([torch.arange(a, a + wd) for a, wd, r in spans if not r])
        weight = tensors[str(w.target)].detach()
        names = []
        for suffix, cols in (("request", req_cols), ("candidate", cand_cols)):
            name = f"_split_{node.name}_{suffix}"
            gm.register_buffer(name, weight[:, cols].contiguous())
            names.append(name)
        req_parts = [p for p, r in zip(parts, is_req, strict=True) if r]
        cand_parts = [p for p, r in zip(parts, is_req, strict=True) if not r]
        with graph.inserting_before(node):
            w_req, w_cand = graph.get_attr(names[0]), graph.get_attr(names[1])
            u = (
                req_parts[0]
                if len(req_parts) == 1
                else graph.call_function(aten.cat.default, (req_parts, -1))
            )
            c = (
                cand_parts[0]
                if len(cand_parts) == 1
                else graph.call_function(aten.cat.default, (cand_parts, -1))
            )
            user_part = graph.call_function(aten.linear.default, (u, w_req))
            cand_part = graph.call_function(aten.linear.default, (c, w_cand, bias))
            total = graph.call_function(aten.add.Tensor, (cand_part, user_part))
        total.meta = dict(node.meta)
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        split += 1
    if split:
        graph.eliminate_dead_code()
    return split


def _split_pairwise_interactions(program: Program) -> int:
    """``bmm(T, T^T)`` over ``T = stack([user..., cand...], 1)``: user x user dot products become request-level.

    The stacked feature rows are reordered user-first, the Gram matrix is built from three blocks
    (``T_u T_u^T`` -- request-level, shared by the next step -- ``T_u T_c^T`` and ``T_c T_c^T``) and put back
    in the original row/column order, so everything downstream (e.g. DLRM's lower-triangle gather) is unchanged.
    """
    graph, gm = program.graph, program.graph_module
    request_on_rows = _request_rows(program)

    split = 0
    for node in list(graph.nodes):
        if node.target is not aten.bmm.default:
            continue
        left, right = node.args[0], node.args[1]
        if not (isinstance(left, torch.fx.Node) and isinstance(right, torch.fx.Node)):
            continue
        if (
            left.target is not aten.stack.default
            or right.target is not aten.transpose.int
            or right.args[0] is not left
        ):
            continue
        if sorted(_int_arg(d) % 3 for d in right.args[1:3]) != [1, 2]:
            continue
        dim = _int_arg(left.args[1]) if len(left.args) > 1 else 0
        parts = list_arg(left, 0)
        if dim % 3 != 1 or not all(_is_matrix(p) for p in parts):
            continue
        is_req = [request_on_rows(p) for p in parts]
        if sum(is_req) < 2 or all(is_req):
            continue
        order = [i for i, r in enumerate(is_req) if r] + [i for i, r in enumerate(is_req) if not r]
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inv_name = f"_pairwise_{node.name}_inverse"
        gm.register_buffer(inv_name, inverse)
        user = [parts[i] for i in order if is_req[i]]
        cand = [parts[i] for i in order if not is_req[i]]
        with graph.inserting_before(node):
            inv = graph.get_attr(inv_name)
            t_u = graph.call_function(aten.stack.default, (user, 1))
            t_c = graph.call_function(aten.stack.default, (cand, 1))
            t_u_t = graph.call_function(aten.transpose.int, (t_u, 1, 2))
            t_c_t = graph.call_function(aten.transpose.int, (t_c, 1, 2))
            uu = graph.call_function(aten.bmm.default, (t_u, t_u_t))
            uc = graph.call_function(aten.bmm.default, (t_u, t_c_t))
            cu = graph.call_function(aten.transpose.int, (uc, 1, 2))
            cc = graph.call_function(aten.bmm.default, (t_c, t_c_t))
            top = graph.call_function(aten.cat.default, ([uu, uc], 2))
            bottom = graph.call_function(aten.cat.default, ([cu, cc], 2))
            permuted = graph.call_function(aten.cat.default, ([top, bottom], 1))
            rows_back = graph.call_function(aten.index_select.default, (permuted, 1, inv))
            gram = graph.call_function(aten.index_select.default, (rows_back, 2, inv))
        gram.meta = dict(node.meta)
        node.replace_all_uses_with(gram)
        graph.erase_node(node)
        split += 1
    if split:
        graph.eliminate_dead_code()
    return split


def _fuse_broadcast_linear(program: Program, request_index: torch.fx.Node) -> int:
    """``act(linear(c, W, b) + index_select(u_r, 0, request_index))`` -> ``codesign::broadcast_linear``."""
    graph = program.graph
    fused = 0
    for node in list(graph.nodes):
        if node.target is not aten.add.Tensor or len(node.args) != 2:
            continue
        lin, gather = node.args
        if getattr(gather, "target", None) is aten.linear.default:
            lin, gather = gather, lin
        if not (isinstance(lin, torch.fx.Node) and isinstance(gather, torch.fx.Node)):
            continue
        if lin.target is not aten.linear.default or len(lin.users) != 1 or _tensor_val(lin) is None:
            continue
        if gather.target is not aten.index_select.default or gather.args[2] is not request_index:
            continue
        if lin.meta["val"].dim() != 2 or len(gather.users) != 1:
            continue
        last, activation = node, "none"
        epilogue = epilogue_activation(node)
        if epilogue is not None:
            last, activation = epilogue
        bias = lin.args[2] if len(lin.args) > 2 else None
        with graph.inserting_before(last):
            op = graph.call_function(
                torch.ops.codesign.broadcast_linear.default,
                (lin.args[0], lin.args[1], bias, gather.args[0], request_index, activation),
            )
        op.meta = dict(last.meta)
        last.replace_all_uses_with(op)
        for dead in dict.fromkeys((last, node, lin, gather)):  # last is node when no activation was fused
            if not dead.users:
                graph.erase_node(dead)
        fused += 1
    return fused


def _add_offsets_to_signature(program: Program) -> None:
    """Extend the graph's pytree calling convention with the ``request_offsets`` keyword input."""
    codegen = program.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None:
        return
    inputs = {**program.example.inputs, REQUEST_OFFSETS: program.example.offsets}
    _, in_spec = pytree.tree_flatten(((), inputs))
    codegen.pytree_info = info._replace(orig_args=[*info.orig_args, REQUEST_OFFSETS], in_spec=in_spec)  # type: ignore[attr-defined]  # only _PyTreeCodeGen has it (checked above)
    program.graph_module._in_spec = in_spec
