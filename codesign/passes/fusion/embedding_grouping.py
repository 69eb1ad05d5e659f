"""``group_embedding_bags``: EmbeddingBag lookups of equal width, dtype and mode become one grouped op (TBE).

``nn.Embedding`` lookups take part as bags of one id each (sum), rewritten so only when they join a group.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from typing import Any

import torch
import torch.fx

from codesign.analysis import count_kernels, node_value, propagate_roles, symbolic_dim
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
    weights_read,
)
from codesign.passes.manager import GAIN_HELP, Pass, PassResult, SkipKind
from codesign.passes.patterns import embedding_as_bag, embedding_bag_lookup, embedding_lookup
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
        # nn.Embedding lookups group as bags of one id each (mode sum); rewritten so only if grouped
        plain = {n: one for n in graph.nodes if (one := embedding_lookup(program, n)) is not None}
        by_key: dict[tuple[Any, ...], list[torch.fx.Node]] = defaultdict(list)
        for node, (weight, ids, _, mode) in lookups.items():
            # request-level lookups stay apart from candidate-level ones (request sharing compresses them)
            by_key[(weight.dtype, weight.shape[1], mode, roles.get(ids.name))].append(node)
        for node, (table, table_ids) in plain.items():
            by_key[(table.dtype, table.shape[1], 0, roles.get(table_ids.name))].append(node)
        rows = {n: int(info[0].shape[0]) for n, info in lookups.items()}
        rows.update({n: int(table.shape[0]) for n, (table, _) in plain.items()})

        def fits(group: list[torch.fx.Node], node: torch.fx.Node) -> bool:
            # a table looked up twice (DIN's item table, for history and candidate) is not copied twice
            if any(m.args[0] is node.args[0] for m in group):
                return False
            return sum(rows[m] for m in group) + rows[node] <= cfg.max_group_rows

        def saves_kernels(group: list[torch.fx.Node]) -> bool:
            # k lookups become one grouped op, plus one arange of offsets per distinct id count of the
            # nn.Embedding members (bags of one id): grouping pays only when that is fewer kernels
            sizes = {symbolic_dim(node_value(plain[m][1]).numel()) for m in group if m in plain}  # type: ignore[union-attr]  # matched lookups have values
            return len(group) > 1 + len(sizes)

        groups = [
            g
            for members in by_key.values()
            for g in independent_groups(members, graph, fits)
            if len(g) >= cfg.min_group and saves_kernels(g)
        ]
        if not groups:
            return PassResult.skipped(
                program,
                SkipKind.NOT_APPLICABLE,
                "no group of EmbeddingBag lookups to merge",
                fix=f"grouping needs at least min_group={cfg.min_group} lookups of equal width, dtype and mode",
            )
        converted = 0
        for members in groups:
            bags = []
            shared_offsets: dict[Any, torch.fx.Node] = {}
            for m in sorted(members, key=list(graph.nodes).index):  # a shared arange precedes its users
                if m in plain:
                    m = embedding_as_bag(program, m, shared_offsets)
                    converted += 1
                    lookups[m] = embedding_bag_lookup(program, m)  # type: ignore[assignment]  # a plain bag
                bags.append(m)
            _group_lookups(program, bags, [lookups[m] for m in bags])
        out = finish_rewrite(program)
        stats = kernels_stats(
            kernels,
            out,
            groups=len(groups),
            lookups_grouped=sum(len(g) for g in groups),
            tables_per_group=[len(g) for g in groups],
            embedding_lookups_grouped=converted,
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
        program,
        f"_grouped_{members[0].name}",
        torch.cat([w.detach() for w in weights]),
        weights_read(members),
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
