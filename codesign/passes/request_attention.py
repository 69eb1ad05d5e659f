"""Attention over request-level keys/values without gathering them per candidate.

Request sharing computes user-side work on R rows (one per request) and, where candidate-level work
needs it, gathers it back to N rows: ``index_select(v_R, 0, request_index)``, followed by the views
the original applied (replayed on the gathered value). In target attention,
``scaled_dot_product_attention(q_N, kv_N, kv_N)`` with ``kv_N`` such a gather copies the user's K/V
once per candidate, [N, H, L, dh]: at large N this copy (and SDPA reading it) dominates.

``fuse_request_attention`` walks each SDPA's ``key`` and ``value`` (and ``attn_mask``) back through
row-preserving views to a gather of an R-row value, replays those views on the R rows, and calls
``codesign::request_attention(q, k_R, v_R, request_offsets, mask_R, scale)`` instead; gathers left
without users are removed. It is one step of the request-sharing rewrite, run after the R-row
values and their gathers exist (``request_sharing._build``, after ``_rewrite``).

>>> fused = fuse_request_attention(program, request_index, offsets)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import sympy
import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

import codesign.ops  # noqa: F401  (registers codesign::request_attention, the op this rewrite targets)
from codesign.analysis import is_row_view, node_value, symbolic_dim
from codesign.ir.program import Program
from codesign.passes.graph_edit import fake_mode_of, insert_call, run_target

__all__ = ["fuse_request_attention"]

aten = torch.ops.aten

# Views replayed on R rows as they are: their arguments never name the row count.
_REPLAY_AS_IS = frozenset(
    {
        aten.transpose.int,
        aten.permute.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unflatten.int,
        aten.flatten.using_ints,
        aten.slice.Tensor,
        aten.select.int,
        aten.narrow.default,
        aten.alias.default,
        aten.detach.default,
    }
)
# Views whose target shape names the row count first: replayed with -1 there (R rows, not N).
_REPLAY_WITH_SHAPE = frozenset(
    {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
)


def fuse_request_attention(
    program: Program,
    request_index: torch.fx.Node,
    offsets: torch.fx.Node,
    compressed_of: Mapping[torch.fx.Node, torch.fx.Node] | None = None,
) -> int:
    """Replace SDPA over per-candidate gathers of request-level K/V by ``codesign::request_attention``.

    ``request_index`` is the [N] node mapping candidate rows to requests (the ``searchsorted`` request
    sharing adds), ``offsets`` the ``request_offsets`` placeholder ([R+1]). ``compressed_of``
    optionally maps N-row request-level nodes to their R-row copies (request sharing's compressed
    values); K/V found there need no gather at all. An SDPA is rewritten when its query has N rows,
    key and value each resolve to R rows (through ``index_select(x_R, 0, request_index)`` or
    ``compressed_of``, then row-preserving views), the mask is absent, resolves the same way or has no
    row dim, and there is no dropout, causal mask or GQA. Edits ``program.graph`` in place (new
    nodes carry fake values); the caller recompiles. Returns how many SDPAs were replaced.
    """
    graph = program.graph
    n_rows = _rows(request_index)
    r_rows = _rows(offsets)
    if n_rows is None or r_rows is None:
        return 0
    r_rows = r_rows - 1
    resolved: dict[torch.fx.Node, torch.fx.Node | None] = {}
    replayed: list[torch.fx.Node] = []  # views this rewrite made on R rows
    sdpa: torch.fx.Node | None = None  # replayed views go right before the SDPA being rewritten

    def on_requests(node: Any) -> torch.fx.Node | None:
        """The R-row equivalent of an N-row node, replaying views on it as needed (None: there is none)."""
        if not isinstance(node, torch.fx.Node):
            return None
        if node not in resolved:
            with graph.inserting_before(sdpa):
                found = _resolve(graph, node, request_index, compressed_of, on_requests, replayed)
            resolved[node] = found if found is not None and _same(_rows(found), r_rows) else None
        return resolved[node]

    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        sdpa = node
        args = _sdpa_args(node)
        if args is None or args["dropout_p"] != 0.0 or args["is_causal"] or args.get("enable_gqa"):
            continue  # dropout, a causal mask or grouped heads: keep SDPA
        q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
        if not _is_4d(q) or not _same(_rows(q), n_rows):
            continue
        k_r, v_r = on_requests(k), on_requests(v)
        if k_r is None or v_r is None or not _compatible(q, k_r, v_r):
            continue
        if mask is None:
            mask_r = None
        elif _is_4d(mask) and _same(_rows(mask), n_rows):
            mask_r = on_requests(mask)  # a mask per candidate: shareable when it is a gathered one
        else:
            mask_r = _shared_mask(mask)
        if mask is not None and mask_r is None:
            continue
        with graph.inserting_before(node):
            new = insert_call(
                graph,
                torch.ops.codesign.request_attention.default,
                (q, k_r, v_r, offsets, mask_r, args["scale"]),
            )
        new.meta = {**node.meta, "val": new.meta["val"]}
        node.replace_all_uses_with(new)
        gathered = [a for a in (k, v, mask) if isinstance(a, torch.fx.Node)]
        graph.erase_node(node)
        _erase_unused(graph, gathered)
        fused += 1
    # views replayed for an SDPA that was then kept (its mask differs per candidate) are dead
    _erase_unused(graph, replayed)
    return fused


def _resolve(
    graph: torch.fx.Graph,
    node: torch.fx.Node,
    request_index: torch.fx.Node,
    compressed_of: Mapping[torch.fx.Node, torch.fx.Node] | None,
    on_requests: Any,
    replayed: list[torch.fx.Node],
) -> torch.fx.Node | None:
    """``node`` on R rows: a ``compressed_of`` entry, a gather's source, or a view replayed on R rows."""
    if compressed_of is not None and node in compressed_of:
        return compressed_of[node]
    if node.target is aten.index_select.default and len(node.args) == 3:
        source, dim, index = node.args
        if index is request_index and dim == 0 and isinstance(source, torch.fx.Node):
            return source
        return None
    if not is_row_view(node) or (node.target not in _REPLAY_AS_IS and node.target not in _REPLAY_WITH_SHAPE):
        return None
    base = on_requests(node.args[0])
    if base is None:
        return None
    rest = list(node.args[1:])
    if node.target in _REPLAY_WITH_SHAPE:
        shape = list(rest[0]) if rest and isinstance(rest[0], list | tuple) else None
        # -1 stands for the rows in view/reshape only when no other size is inferred
        if not shape or (node.target is not aten.expand.default and -1 in shape[1:]):
            return None
        rest[0] = [-1, *shape[1:]]
    if _has_node((rest, node.kwargs)):
        return None  # a size computed in the graph (it may count candidates): not replayable on R rows
    mode = fake_mode_of(graph)
    try:
        with mode if mode is not None else contextlib.nullcontext():
            val = run_target(node, (base.meta["val"], *rest), dict(node.kwargs))
    except (RuntimeError, ValueError, IndexError):  # the view does not apply to R rows
        return None
    view = graph.call_function(node.target, (base, *rest), dict(node.kwargs))  # type: ignore[arg-type]  # a view op is callable
    view.meta = {**node.meta, "val": val}
    replayed.append(view)
    return view


def _has_node(value: Any) -> bool:
    if isinstance(value, torch.fx.Node):
        return True
    if isinstance(value, list | tuple):
        return any(_has_node(v) for v in value)
    if isinstance(value, dict):
        return any(_has_node(v) for v in value.values())
    return False


def _sdpa_args(node: torch.fx.Node) -> dict[str, Any] | None:
    """SDPA's arguments by name, defaults filled in (None if they do not bind to its schema)."""
    bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)  # type: ignore[arg-type]  # an OpOverload is callable
    return dict(bound.kwargs) if bound is not None else None


def _rows(node: Any) -> Any:
    """The (symbolic) size of dim 0 of a node's tensor value, or None."""
    val = node_value(node) if isinstance(node, torch.fx.Node) else None
    return symbolic_dim(val.shape[0]) if val is not None and val.dim() > 0 else None


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    if a == b:
        return True
    return bool(sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0)


def _is_4d(node: Any) -> bool:
    val = node_value(node) if isinstance(node, torch.fx.Node) else None
    return val is not None and val.dim() == 4


def _compatible(q: Any, k: Any, v: Any) -> bool:
    """4-D q [N, H, Lq, dh], k [R, H, L, dh], v [R, H, L, dv]: what ``request_attention`` takes."""
    if not (_is_4d(q) and _is_4d(k) and _is_4d(v)):
        return False
    qs, ks, vs = (node_value(x).shape for x in (q, k, v))  # type: ignore[union-attr]  # 4-D: checked above
    return (
        _same(symbolic_dim(qs[1]), symbolic_dim(ks[1]))
        and _same(symbolic_dim(ks[1]), symbolic_dim(vs[1]))
        and _same(symbolic_dim(qs[3]), symbolic_dim(ks[3]))
        and _same(symbolic_dim(ks[2]), symbolic_dim(vs[2]))
    )


def _shared_mask(mask: Any) -> Any:
    """A mask with no candidate dim (fewer than 4 dims, or dim 0 of size 1): the same for every request."""
    val = node_value(mask) if isinstance(mask, torch.fx.Node) else None
    if val is None:
        return None
    if val.dim() < 4 or (isinstance(val.shape[0], int) and val.shape[0] == 1):
        return mask
    return None


def _erase_unused(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase ``nodes`` that have no users, then their inputs that are left without users (pure ops only)."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node.graph is not graph or node.users or node.op != "call_function" or _erased(node):
            continue
        if not _is_view_or_gather(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        todo.extend(inputs)


def _erased(node: torch.fx.Node) -> bool:
    return bool(getattr(node, "_erased", False))


def _is_view_or_gather(node: torch.fx.Node) -> bool:
    return node.target is aten.index_select.default or node.target in _REPLAY_AS_IS | _REPLAY_WITH_SHAPE
