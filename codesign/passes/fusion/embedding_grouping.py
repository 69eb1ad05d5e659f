"""``group_embedding_bags``: EmbeddingBag lookups of equal width, dtype and mode become one grouped op (TBE)."""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from typing import Any

import torch
import torch.fx

from codesign.analysis import count_kernels, propagate_roles
from codesign.config import Config, knob, register_config
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.passes.fusion.common import (
    independent_groups,
    kernels_stats,
    latest,
)
from codesign.passes.graph_edit import (
    finish_rewrite,
    insert_call,
    register_constant,
)
from codesign.passes.manager import GAIN_HELP, Pass, PassResult, SkipKind
from codesign.passes.patterns import (
    embedding_bag_lookup,
)
from codesign.passes.registry import register_pass

aten = torch.ops.aten

__all__ = ["EmbeddingGrouping", "EmbeddingGroupingConfig"]


@register_config
@dataclasses.dataclass(frozen=True)
class EmbeddingGroupingConfig(Config):
    min_group: int = knob(2, low=2, high=64, help="fewest EmbeddingBag lookups grouped into one op")
    # bigger groups are split so no single weight grows unbounded
    max_group_rows: int = knob(
        1 << 31, low=1024, high=1 << 40, log=True, help="largest concatenated table, in rows"
    )
    # one launch instead of T, but every id is copied, shifted and checked first (a loss where launches
    # are cheap, e.g. CPUs)
    require_predicted_gain: bool = knob(True, help=GAIN_HELP)


@register_pass
class EmbeddingGrouping(Pass[EmbeddingGroupingConfig]):
    """EmbeddingBag lookups of equal width, dtype and mode -> one ``codesign::grouped_embedding_bag``."""

    name = "group_embedding_bags"
    config_class = EmbeddingGroupingConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg = self.config
        if program.metadata.get("sharding_plan"):
            # sharded tables live on different devices; the sharded runtime looks each one up
            return PassResult.skipped(
                program,
                SkipKind.NOT_APPLICABLE,
                "embedding tables are sharded across devices",
                fix="the sharded runtime looks each table up on its own device",
            )
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
            for g in independent_groups(members, graph, fits)
            if len(g) >= cfg.min_group
        ]
        if not groups:
            return PassResult.skipped(
                program,
                SkipKind.NOT_APPLICABLE,
                "no group of EmbeddingBag lookups to merge",
                fix=f"grouping needs at least min_group={cfg.min_group} lookups of equal width, dtype and mode",
            )
        for members in groups:
            _group_lookups(program, members, [lookups[m] for m in members])
        out = finish_rewrite(program)
        stats = kernels_stats(
            kernels,
            out,
            groups=len(groups),
            lookups_grouped=sum(len(g) for g in groups),
            tables_per_group=[len(g) for g in groups],
        )
        return PassResult(out, True, stats)


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
    with graph.inserting_after(latest(graph, (*ids, *offsets))):
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
