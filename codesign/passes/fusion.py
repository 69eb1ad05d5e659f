"""Graph-kernel fusion: fewer, larger kernels for models made of many small ones.

Ranking models are many narrow layers: tens of embedding tables, several heads and experts on the
same features, one tower per task. Each is a kernel launch (a dispatch on CPU) doing little work.
Inductor fuses pointwise work into GEMM epilogues but keeps the model's structure; these passes
change the structure:

* ``group_embedding_bags``: EmbeddingBag lookups of equal width and dtype become one
  ``codesign::grouped_embedding_bag`` over a concatenated table (the TBE idea);
* ``fuse_shared_input_linears``: Linears that read the same input become one GEMM and a split
  (multi-task heads, MMoE experts and gates, separate Q/K/V projections);
* ``fuse_parallel_linears``: Linears of equal shape on different, independent inputs become one
  batched GEMM (``baddbmm``) over stacked inputs; identical activations after them are applied
  once to the batch and a stack of the batch's own slices is the batch again, so whole parallel
  towers run as one chain of batched kernels;
* ``fuse_linear_epilogue``: Linear + activation become ``codesign::fused_linear`` (one Triton
  kernel on CUDA) where the backend does not fuse the epilogue itself.

Every pass keeps numerics (fp32 sums may reorder: tolerance ``REORDERED``), reports kernels before
and after, and leaves graphs without its pattern untouched. Grouping never mixes request-level and
candidate-level lookups, so running after ``request_sharing`` keeps its work shared.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.fx

import codesign.ops
from codesign.analysis import analyze, count_kernels, propagate_roles
from codesign.config import Config, register_config
from codesign.hardware.costmodel import estimate_analysis
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.numerics import Tolerance
from codesign.passes.graph_edit import (
    finish_rewrite,
    insert_call,
    node_value,
    param_value,
    register_constant,
    stable_topological_sort,
)
from codesign.passes.manager import Knob, Pass, PassResult, gain_knob

__all__ = [
    "REORDERED",
    "UNARY_ACTIVATIONS",
    "EmbeddingGrouping",
    "EmbeddingGroupingConfig",
    "LinearEpilogueConfig",
    "LinearEpilogueFusion",
    "ParallelLinearConfig",
    "ParallelLinearFusion",
    "SharedInputLinearConfig",
    "SharedInputLinearFusion",
    "embedding_bag_lookup",
    "fusion_passes",
]

aten = torch.ops.aten

# A fused GEMM sums the same products in another blocking order: fp32 results move by a few ulps.
REORDERED = Tolerance(rtol=1e-4, atol=1e-5)
# Cost-model gates judge a rewrite at this batch (the size request sharing reports at).
GATE_CANDIDATES, GATE_REQUESTS = 1024, 16
_MAX_ROUNDS = 256

UNARY_ACTIVATIONS: dict[Any, str] = {
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
    aten.gelu.default: "gelu",
}
# Elementwise ops whose only tensor input is the value itself: the same on a stack as on each slice.
_HOISTABLE = (*UNARY_ACTIVATIONS, aten.silu.default, aten.neg.default, aten.exp.default)


# ---- shared graph helpers -----------------------------------------------------------------


def _latest(graph: torch.fx.Graph, nodes: Sequence[Any]) -> torch.fx.Node:
    """The node of ``nodes`` that comes last in the graph (a fused node must follow all its inputs)."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    return max(nodes, key=position.__getitem__)  # type: ignore[no-any-return]


def _ancestors(graph: torch.fx.Graph) -> tuple[dict[torch.fx.Node, int], dict[torch.fx.Node, int]]:
    """(bit of each node, bitmask of its ancestors): independence checks in O(1) per pair."""
    bit: dict[torch.fx.Node, int] = {}
    anc: dict[torch.fx.Node, int] = {}
    for i, node in enumerate(graph.nodes):
        bit[node] = 1 << i
        mask = 0
        for a in node.all_input_nodes:
            mask |= anc[a] | bit[a]
        anc[node] = mask
    return bit, anc


def _independent_groups(
    nodes: Sequence[torch.fx.Node],
    graph: torch.fx.Graph,
    accept: Callable[[list[torch.fx.Node], torch.fx.Node], bool],
) -> list[list[torch.fx.Node]]:
    """Greedy partition of ``nodes`` (graph order) into groups where no member depends on another."""
    bit, anc = _ancestors(graph)
    groups: list[list[torch.fx.Node]] = []
    for node in nodes:
        for group in groups:
            if accept(group, node) and all(
                not (anc[node] & bit[m]) and not (anc[m] & bit[node]) for m in group
            ):
                group.append(node)
                break
        else:
            groups.append([node])
    return groups


def _kernels_stats(before: int, program: Program, **extra: Any) -> dict[str, Any]:
    return {"kernels_before": before, "kernels_after": count_kernels(program), **extra}


def _predicted_latency(program: Program, target: Target) -> float:
    return estimate_analysis(analyze(program, GATE_CANDIDATES, GATE_REQUESTS), target).latency_s


def _gated(original: Program | None, out: Program, target: Target, stats: dict[str, Any]) -> PassResult:
    """Keep ``out`` unless a gate was asked for (``original`` given) and the cost model prefers the original."""
    if original is None:
        return PassResult(out, True, stats)
    before, after = _predicted_latency(original, target), _predicted_latency(out, target)
    stats.update(predicted_latency_before_s=before, predicted_latency_after_s=after)
    if after >= before:
        stats["reason"] = "the cost model predicts no gain on this target"
        return PassResult(original, False, stats)
    return PassResult(out, True, stats)


def _replace_with_slices(
    graph: torch.fx.Graph, members: Sequence[torch.fx.Node], values: Sequence[torch.fx.Node]
) -> None:
    """Point every user of ``members[i]`` at ``values[i]`` (a slice of the fused result).

    A slice along the last dim is strided; ``aten.view`` users need contiguous memory, so they get a
    contiguous copy (the other users keep the free view).
    """
    for member, value in zip(members, values, strict=True):
        viewers = [u for u in member.users if u.target is aten.view.default]
        if viewers:
            with graph.inserting_after(value):
                dense = insert_call(
                    graph, aten.clone.default, (value,), {"memory_format": torch.contiguous_format}
                )
            for u in viewers:
                u.replace_input_with(member, dense)
        member.replace_all_uses_with(value)
        graph.erase_node(member)


# ---- 1. grouped embedding lookup ----------------------------------------------------------


@register_config
@dataclasses.dataclass(frozen=True)
class EmbeddingGroupingConfig(Config):
    min_group: int = 2  # fewest lookups worth one grouped op
    # largest concatenated table (rows); bigger groups are split so no single weight grows unbounded
    max_group_rows: int = 1 << 31
    # keep the rewrite only when the cost model predicts it faster: one launch instead of T, but
    # every id is copied, shifted and checked first (a loss where launches are cheap, e.g. CPUs)
    require_predicted_gain: bool = True


def embedding_bag_lookup(program: Program, node: torch.fx.Node) -> tuple[torch.Tensor, Any, Any, int] | None:
    """(table, ids node, offsets node, mode) of an EmbeddingBag lookup the grouped op can take."""
    if node.target not in (aten.embedding_bag.padding_idx, aten.embedding_bag.default):
        return None
    args = list(node.args) + [None] * 9
    weight, ids, offsets = param_value(program, args[0]), args[1], args[2]
    mode: Any = args[4] if args[4] is not None else 0
    per_sample, last_offset = args[6], bool(args[7])
    padding = args[8] if node.target is aten.embedding_bag.padding_idx else None
    if weight is None or weight.dim() != 2 or not isinstance(ids, torch.fx.Node):
        return None
    if not isinstance(offsets, torch.fx.Node) or per_sample is not None or last_offset:
        return None
    if padding not in (None, -1) or int(mode) not in codesign.ops.EMBEDDING_BAG_MODES:
        return None
    # only the pooled output (getitem 0) may be used: the others are autograd bookkeeping
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
        return None
    ids_val, offsets_val = node_value(ids), node_value(offsets)
    if ids_val is None or ids_val.dim() != 1 or offsets_val is None or offsets_val.dim() != 1:
        return None
    return weight, ids, offsets, int(mode)


class EmbeddingGrouping(Pass):
    """EmbeddingBag lookups of equal width, dtype and mode -> one ``codesign::grouped_embedding_bag``."""

    name = "group_embedding_bags"
    config_class = EmbeddingGroupingConfig

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (
            Knob(
                "min_group", "int", 2, low=2, high=64, doc="fewest EmbeddingBag lookups grouped into one op"
            ),
            Knob(
                "max_group_rows",
                "int",
                1 << 31,
                low=1024,
                high=1 << 40,
                log=True,
                doc="largest concatenated table, in rows",
            ),
            gain_knob(),
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg: EmbeddingGroupingConfig = self.config  # type: ignore[assignment]
        if program.metadata.get("sharding_plan"):
            # sharded tables live on different devices; the sharded runtime looks each one up
            return PassResult(program, False, {"skipped": "embedding tables are sharded across devices"})
        kernels = count_kernels(program)
        graph = program.graph
        roles = propagate_roles(program)
        lookups = {n: info for n in graph.nodes if (info := embedding_bag_lookup(program, n)) is not None}
        by_key: dict[tuple[Any, ...], list[torch.fx.Node]] = defaultdict(list)
        for node, (weight, ids, _, mode) in lookups.items():
            # request-level lookups stay apart from candidate-level ones (request sharing compresses them)
            by_key[(weight.dtype, weight.shape[1], mode, roles.get(ids.name))].append(node)
        rows = {n: lookups[n][0].shape[0] for n in lookups}

        def fits(group: list[torch.fx.Node], node: torch.fx.Node) -> bool:
            return sum(rows[m] for m in group) + rows[node] <= cfg.max_group_rows

        groups = [
            g
            for members in by_key.values()
            for g in _independent_groups(members, graph, fits)
            if len(g) >= cfg.min_group
        ]
        if not groups:
            return PassResult(program, False, {"reason": "no group of EmbeddingBag lookups to merge"})
        original = program.copy() if cfg.require_predicted_gain else None
        for members in groups:
            _group_lookups(program, members, [lookups[m] for m in members])
        out = finish_rewrite(program)
        stats = _kernels_stats(
            kernels,
            out,
            groups=len(groups),
            lookups_grouped=sum(len(g) for g in groups),
            tables_per_group=[len(g) for g in groups],
        )
        return _gated(original, out, target, stats)


def _group_lookups(
    program: Program, members: list[torch.fx.Node], infos: list[tuple[torch.Tensor, Any, Any, int]]
) -> None:
    graph = program.graph
    weights = [w for w, *_ in infos]
    starts = [0]
    for w in weights:
        starts.append(starts[-1] + int(w.shape[0]))
    table = register_constant(
        program, f"_grouped_{members[0].name}", torch.cat([w.detach() for w in weights])
    )
    ids = [i for _, i, _, _ in infos]
    offsets = [o for _, _, o, _ in infos]
    with graph.inserting_after(_latest(graph, (*ids, *offsets))):
        grouped = insert_call(
            graph,
            torch.ops.codesign.grouped_embedding_bag.default,
            (table, ids, offsets, starts, infos[0][3]),
        )
    with graph.inserting_after(grouped):
        sizes = [insert_call(graph, aten.sym_size.int, (o, 0)) for o in offsets]
    with graph.inserting_after(sizes[-1]):
        parts = insert_call(graph, aten.split_with_sizes.default, (grouped, sizes))
    with graph.inserting_after(parts):
        pooled = [insert_call(graph, operator.getitem, (parts, t)) for t in range(len(members))]
    for member, value in zip(members, pooled, strict=True):
        for user in list(member.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(value)
            graph.erase_node(user)
        graph.erase_node(member)


# ---- 2. Linears sharing one input ---------------------------------------------------------


@register_config
@dataclasses.dataclass(frozen=True)
class SharedInputLinearConfig(Config):
    min_group: int = 2  # fewest Linears on one input worth one GEMM


def _linear_parts(
    program: Program, node: torch.fx.Node
) -> tuple[Any, torch.Tensor, torch.Tensor | None] | None:
    """(input, weight, bias) of a Linear (or ``codesign::broadcast_linear``) whose weight and bias are parameters."""
    if node.target not in (aten.linear.default, torch.ops.codesign.broadcast_linear.default):
        return None
    x, w_node = node.args[0], node.args[1]
    b_node = node.args[2] if len(node.args) > 2 else None
    weight = param_value(program, w_node)
    bias = param_value(program, b_node) if b_node is not None else None
    if weight is None or weight.dim() != 2 or (b_node is not None and bias is None):
        return None
    if node_value(x) is None:
        return None
    return x, weight, bias


def _shared_input_key(program: Program, node: torch.fx.Node) -> tuple[Any, ...] | None:
    """Linears with equal keys can share one GEMM: same input and dtype (and, for broadcast_linear,
    the same request index and activation; their per-request rows are concatenated too)."""
    parts = _linear_parts(program, node)
    if parts is None:
        return None
    if node.target is aten.linear.default:
        return ("linear", parts[0], parts[1].dtype)
    row = node_value(node.args[3])
    if row is None or row.dim() != 2:
        return None
    return ("broadcast_linear", parts[0], parts[1].dtype, node.args[4], node.args[5])


class SharedInputLinearFusion(Pass):
    """Linears reading the same input -> one Linear over concatenated weights, then a split."""

    name = "fuse_shared_input_linears"
    config_class = SharedInputLinearConfig
    tolerance: ClassVar[Tolerance] = REORDERED

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (
            Knob(
                "min_group", "int", 2, low=2, high=16, doc="fewest Linears on one input fused into one GEMM"
            ),
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg: SharedInputLinearConfig = self.config  # type: ignore[assignment]
        kernels = count_kernels(program)
        groups: dict[tuple[Any, ...], list[torch.fx.Node]] = defaultdict(list)
        for node in program.graph.nodes:
            key = _shared_input_key(program, node)
            if key is not None:
                groups[key].append(node)
        fused = [
            g
            for members in groups.values()
            for g in _independent_groups(members, program.graph, lambda group, node: True)
            if len(g) >= cfg.min_group
        ]
        if not fused:
            return PassResult(program, False, {"reason": "no two Linears read the same input"})
        for members in fused:
            _fuse_shared_input(program, members)
        out = finish_rewrite(program)
        return PassResult(
            out,
            True,
            _kernels_stats(kernels, out, groups=len(fused), linears_fused=sum(len(g) for g in fused)),
        )


def _fuse_shared_input(program: Program, members: list[torch.fx.Node]) -> None:
    graph = program.graph
    parts = [p for m in members if (p := _linear_parts(program, m)) is not None]
    x = parts[0][0]
    weights = [p[1] for p in parts]
    w = register_constant(
        program, f"_fused_{members[0].name}_weight", torch.cat([t.detach() for t in weights])
    )
    bias = None
    if any(p[2] is not None for p in parts):
        b = torch.cat(
            [
                p[2].detach() if p[2] is not None else weights[i].new_zeros(weights[i].shape[0])
                for i, p in enumerate(parts)
            ]
        )
        bias = register_constant(program, f"_fused_{members[0].name}_bias", b)
    target: Any = members[0].target
    if target is aten.linear.default:
        args: tuple[Any, ...] = (x, w, bias)
    else:  # broadcast_linear: the per-request rows are concatenated like the weights
        rows = [m.args[3] for m in members if isinstance(m.args[3], torch.fx.Node)]
        with graph.inserting_after(_latest(graph, rows)):
            row = insert_call(graph, aten.cat.default, (rows, -1))
        args = (x, w, bias, row, *members[0].args[4:])
    with graph.inserting_before(members[0]):
        gemm = insert_call(graph, target, args)
        split = insert_call(
            graph, aten.split_with_sizes.default, (gemm, [int(t.shape[0]) for t in weights], -1)
        )
        slices = [insert_call(graph, operator.getitem, (split, i)) for i in range(len(members))]
    _replace_with_slices(graph, members, slices)


# ---- 3. parallel towers -> batched GEMM ---------------------------------------------------


@register_config
@dataclasses.dataclass(frozen=True)
class ParallelLinearConfig(Config):
    min_group: int = 2  # fewest parallel Linears batched into one GEMM
    # keep the rewrite only when the cost model predicts it faster (stacking copies the inputs)
    require_predicted_gain: bool = True


_GROUPS = "codesign_groups"  # meta key: number of slices of an unbind this pass created


class ParallelLinearFusion(Pass):
    """Equal-shape Linears on independent inputs -> one ``baddbmm`` over stacked inputs.

    Then, until nothing changes: an activation applied to every slice of a batch is applied once
    to the batch, and ``stack`` of a batch's slices in order is the batch itself. Parallel towers
    (one per task) become one chain of batched kernels.
    """

    name = "fuse_parallel_linears"
    config_class = ParallelLinearConfig
    tolerance: ClassVar[Tolerance] = REORDERED

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (
            Knob("min_group", "int", 2, low=2, high=16, doc="fewest parallel Linears batched into one GEMM"),
            gain_knob(),
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg: ParallelLinearConfig = self.config  # type: ignore[assignment]
        kernels = count_kernels(program)
        original = program.copy() if cfg.require_predicted_gain else None
        batched = hoisted = cancelled = 0
        for _ in range(_MAX_ROUNDS):
            step = _batch_parallel_linears(program, cfg.min_group)
            if step:
                stable_topological_sort(program.graph)
            h, c = _hoist_pointwise(program.graph), _cancel_stack_of_slices(program.graph)
            batched, hoisted, cancelled = batched + step, hoisted + h, cancelled + c
            if not (step or h or c):
                break
        if not batched:
            return PassResult(program, False, {"reason": "no parallel Linears of equal shape"})
        out = finish_rewrite(program)
        stats = _kernels_stats(
            kernels, out, linears_batched=batched, activations_batched=hoisted, stacks_removed=cancelled
        )
        return _gated(original, out, target, stats)


def _batch_parallel_linears(program: Program, min_group: int) -> int:
    """One round: group independent Linears by (weight shape, dtype, bias, input shape); returns Linears batched."""
    graph = program.graph
    found: dict[tuple[Any, ...], list[torch.fx.Node]] = defaultdict(list)
    parts: dict[torch.fx.Node, tuple[Any, torch.Tensor, torch.Tensor | None]] = {}
    for node in graph.nodes:
        p = _linear_parts(program, node)
        x_val = node_value(p[0]) if p is not None else None
        if p is None or x_val is None or x_val.dim() != 2:
            continue
        parts[node] = p
        key = (
            tuple(p[1].shape),
            p[1].dtype,
            p[2] is not None,
            tuple(str(d) for d in x_val.shape),
            x_val.dtype,
        )
        found[key].append(node)

    def distinct_input(group: list[torch.fx.Node], node: torch.fx.Node) -> bool:
        return all(parts[m][0] is not parts[node][0] for m in group)

    for members in found.values():
        for group in _independent_groups(members, graph, distinct_input):
            if len(group) >= min_group:
                # one group per round: batching adds dependencies, so the next grouping needs fresh ancestry
                _batch(program, group, [parts[m] for m in group])
                return len(group)
    return 0


def _batch(
    program: Program, members: list[torch.fx.Node], parts: list[tuple[Any, torch.Tensor, Any]]
) -> None:
    graph = program.graph
    name = members[0].name
    w = register_constant(program, f"_batched_{name}_weight", torch.stack([p[1].detach().t() for p in parts]))
    bias = None
    if parts[0][2] is not None:
        bias = register_constant(
            program, f"_batched_{name}_bias", torch.stack([p[2].detach()[None, :] for p in parts])
        )
    inputs = [p[0] for p in parts]
    with graph.inserting_after(_latest(graph, inputs)):
        stacked = insert_call(graph, aten.stack.default, (inputs, 0))
    with graph.inserting_after(stacked):
        if bias is None:
            gemm = insert_call(graph, aten.bmm.default, (stacked, w))
        else:  # baddbmm's shape rule cannot broadcast over symbolic rows: expand the bias first (a view)
            rows = insert_call(graph, aten.sym_size.int, (stacked, 1))
            groups, width = len(members), int(parts[0][1].shape[0])
            expanded = insert_call(graph, aten.expand.default, (bias, [groups, rows, width]))
            gemm = insert_call(graph, aten.baddbmm.default, (expanded, stacked, w))
    with graph.inserting_after(gemm):
        slices = _unbind(graph, gemm, len(members))
    for member, value in zip(members, slices, strict=True):
        member.replace_all_uses_with(value)
        graph.erase_node(member)


def _unbind(graph: torch.fx.Graph, batch: torch.fx.Node, groups: int) -> list[torch.fx.Node]:
    unbind = insert_call(graph, aten.unbind.int, (batch, 0))
    unbind.meta[_GROUPS] = groups
    with graph.inserting_after(unbind):
        return [insert_call(graph, operator.getitem, (unbind, i)) for i in range(groups)]


def _slices(unbind: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The getitem nodes of an unbind this pass made, in slice order (None if one is missing)."""
    groups = unbind.meta.get(_GROUPS)
    if unbind.target is not aten.unbind.int or groups is None:
        return None
    items = {u.args[1]: u for u in unbind.users if u.target is operator.getitem}
    return [items[i] for i in range(groups)] if len(items) == groups else None


def _hoist_pointwise(graph: torch.fx.Graph) -> int:
    """``op(slice_i)`` for every slice of a batch -> slices of ``op(batch)``."""
    hoisted = 0
    for unbind in [n for n in graph.nodes if n.meta.get(_GROUPS)]:
        slices = _slices(unbind)
        if slices is None:
            continue
        for target in _HOISTABLE:
            users = []
            for s in slices:
                match = [u for u in s.users if u.target is target and u.args == (s,)]
                users.append(match[0] if match else None)
            if any(u is None for u in users) or len({repr(u.kwargs) for u in users}) != 1:  # type: ignore[union-attr]
                continue
            with graph.inserting_after(unbind):
                applied = insert_call(graph, target, (unbind.args[0],), dict(users[0].kwargs))  # type: ignore[union-attr]
            with graph.inserting_after(applied):
                new_slices = _unbind(graph, applied, len(slices))
            for old, new in zip(users, new_slices, strict=True):
                old.replace_all_uses_with(new)  # type: ignore[union-attr]
                graph.erase_node(old)  # type: ignore[arg-type]
            hoisted += 1
    return hoisted


def _cancel_stack_of_slices(graph: torch.fx.Graph) -> int:
    """``stack([unbind(b)[0], ..., unbind(b)[G-1]], 0)`` -> ``b``."""
    cancelled = 0
    for node in list(graph.nodes):
        if node.target is not aten.stack.default or (len(node.args) > 1 and node.args[1] != 0):
            continue
        items = list(node.args[0])  # type: ignore[arg-type]
        first = items[0] if items else None
        if not isinstance(first, torch.fx.Node) or first.target is not operator.getitem:
            continue
        unbind = first.args[0]
        if not isinstance(unbind, torch.fx.Node) or _slices(unbind) != items:
            continue
        node.replace_all_uses_with(unbind.args[0])  # type: ignore[arg-type]
        graph.erase_node(node)
        cancelled += 1
    return cancelled


# ---- 4. Linear + activation epilogue ------------------------------------------------------

EPILOGUE_MODES = ("gpu", "always", "never")


@register_config
@dataclasses.dataclass(frozen=True)
class LinearEpilogueConfig(Config):
    # "gpu": only on GPU targets (where codesign's Triton kernel runs); CPU gains nothing from it
    when: str = "gpu"


class LinearEpilogueFusion(Pass):
    """Linear + bias + activation -> ``codesign::fused_linear`` (one Triton kernel on CUDA).

    Inductor and AOTInductor fuse this epilogue themselves; the op is for the eager backend on a
    GPU and for backends that do not fuse (it is opaque to them, so on CPU it is left off).
    """

    name = "fuse_linear_epilogue"
    config_class = LinearEpilogueConfig

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (
            Knob(
                "when",
                "categorical",
                "gpu",
                choices=EPILOGUE_MODES,
                doc="rewrite Linear+activation to codesign::fused_linear: on GPU targets, always, never",
            ),
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        when = self.config.when  # type: ignore[attr-defined]
        if when == "never" or (when == "gpu" and target.hardware.kind != "gpu"):
            return PassResult(program, False, {"reason": f"when={when!r} on a {target.hardware.kind} target"})
        kernels = count_kernels(program)
        graph = program.graph
        fused = 0
        for node in list(graph.nodes):
            if _linear_parts(program, node) is None or len(node.users) != 1:
                continue
            (act,) = node.users
            name = UNARY_ACTIVATIONS.get(act.target)
            if (
                name is None
                or act.args != (node,)
                or (name == "gelu" and act.kwargs.get("approximate", "none") != "none")
            ):
                continue
            bias = node.args[2] if len(node.args) > 2 else None
            with graph.inserting_before(act):
                op = insert_call(
                    graph, torch.ops.codesign.fused_linear.default, (node.args[0], node.args[1], bias, name)
                )
            op.meta = dict(act.meta)
            act.replace_all_uses_with(op)
            graph.erase_node(act)
            graph.erase_node(node)
            fused += 1
        if not fused:
            return PassResult(program, False, {"reason": "no Linear followed by a fusable activation"})
        program.recompile()
        return PassResult(program, True, _kernels_stats(kernels, program, linears_fused=fused))


def fusion_passes() -> list[Pass]:
    """The fusion pipeline in its useful order: lookups, shared inputs, parallel towers, epilogues."""
    return [EmbeddingGrouping(), SharedInputLinearFusion(), ParallelLinearFusion(), LinearEpilogueFusion()]
