"""Pass ``shard_embeddings``: plan the program's embedding tables across the target's devices.

The pass reads every EmbeddingBag table of the program (rows, width, storage) and measures how
often each is read on sample requests (ids and bags per candidate, so request-level tables that
request sharing looks up once per request count as such). It plans them with
``codesign.sharding.plan_sharding`` and attaches the plan to the program's metadata; the graph
itself is unchanged (it still runs on one device). ``codesign.sharding.ShardedProgram`` runs the
plan across processes; bundles carry it as ``plan.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.fx

from codesign.config import Config, knob, register_config
from codesign.errors import PassError, ShardingError
from codesign.hardware.costmodel import estimate
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.ir.request import flatten_inputs
from codesign.passes.graph_edit import finish_rewrite
from codesign.passes.manager import Pass, PassResult, SkipKind
from codesign.passes.patterns import embedding_as_bag, embedding_lookup
from codesign.passes.registry import register_pass
from codesign.sharding.planner import PlannerConfig, plan_sharding
from codesign.sharding.runtime import Lookup, find_lookups, table_storage
from codesign.sharding.types import SHARDING_TYPES, TABLE_FORMATS, PlanWorkload, TableSpec, Topology

__all__ = ["SHARDING_PRESETS", "ShardEmbeddings", "ShardingConfig", "parse_sharding_types", "program_tables"]

# Named sets of allowed sharding types (search picks among these; any comma list works by hand).
SHARDING_PRESETS = {
    "all": SHARDING_TYPES,
    "no_replicas": ("table_wise", "row_wise", "column_wise", "table_row_wise"),
    "table_and_row": ("table_wise", "row_wise", "table_row_wise"),
    "table_wise": ("table_wise",),
}
_SAMPLE_CANDIDATES = (64, 32, 1, 31)  # requests of the batch that measures ids per candidate


def parse_sharding_types(value: str) -> tuple[str, ...]:
    """A preset name (``all``, ``no_replicas`` ...) or a comma list of sharding types."""
    if value in SHARDING_PRESETS:
        return SHARDING_PRESETS[value]
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in SHARDING_TYPES]
    if bad or not kinds:
        raise ShardingError(
            f"sharding types {value!r}: unknown {bad or 'empty list'}",
            fix=f"use a preset {sorted(SHARDING_PRESETS)} or a comma list of {list(SHARDING_TYPES)}",
        )
    return kinds


@register_config
@dataclasses.dataclass(frozen=True)
class ShardingConfig(Config):
    devices: int = 0  # 0: the target's device count
    sharding_types: str = knob(
        "all",
        choices=tuple(SHARDING_PRESETS),
        help="sharding types the planner may use (replicas trade memory for no communication)",
    )
    allowed_types: tuple[str, ...] = ()  # explicit sharding types; overrides the preset when given
    memory_margin: float = knob(0.1, low=0.0, high=0.3, step=0.05, help="device memory kept free")
    table_format: str = knob(
        "model",
        choices=("model", "bf16", "fp8", "int8"),
        help="storage of float tables in the plan (the runtime stores each shard so)",
    )
    batch_per_device: int = 8192  # candidates each device scores per step
    constraints: tuple[tuple[str, str], ...] = ()  # (table, sharding type) forced


class _Recorder(torch.fx.Interpreter):
    """Runs the graph and keeps the values of the named nodes."""

    def __init__(self, gm: torch.fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.values: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.keep:
            self.values[n.name] = value
        return value


def program_tables(
    program: Program, table_format: str = "model"
) -> tuple[list[TableSpec], list[Lookup], list[str]]:
    """The program's EmbeddingBag tables with ids and bags per candidate measured on sample
    requests; the lookups; and the embedding lookups that cannot be sharded (with the reason)."""
    gm = program.graph_module
    lookups, refused = find_lookups(gm)
    if not lookups:
        return [], [], refused
    batch = program.sample_batch(list(_SAMPLE_CANDIDATES), seed=0)
    rec = _Recorder(gm, {x for lk in lookups for x in (lk.ids, lk.offsets)})
    flat = [v for _, v in flatten_inputs(program.call_inputs(batch))]
    with torch.no_grad():
        rec.run(*flat)
    n = batch.num_candidates
    ids: dict[str, float] = {}
    bags: dict[str, float] = {}
    for lk in lookups:
        ids[lk.table] = ids.get(lk.table, 0.0) + rec.values[lk.ids].numel() / n
        bags[lk.table] = bags.get(lk.table, 0.0) + rec.values[lk.offsets].numel() / n
    tables, seen = [], set()
    for lk in lookups:
        if lk.table in seen:
            continue
        seen.add(lk.table)
        weight = program.fetch_attr(lk.table)
        have = table_storage(gm, lk)
        storage = have if table_format == "model" or lk.scale is not None else table_format
        pooling = lk.mode
        if any(o.table == lk.table and o.mode != lk.mode for o in lookups):
            pooling = "max" if any(o.table == lk.table and o.mode == "max" for o in lookups) else "mean"
        tables.append(
            TableSpec(
                lk.table,
                int(weight.shape[0]),
                int(weight.shape[1]),
                ids[lk.table],
                bags[lk.table],
                pooling,
                storage,
            )
        )
    return tables, lookups, refused


@register_pass
class ShardEmbeddings(Pass[ShardingConfig]):
    """Plan every EmbeddingBag and nn.Embedding table across the target's devices (the plan is metadata;
    nn.Embedding lookups are rewritten as EmbeddingBags of one id per bag so the sharded runtime takes them)."""

    name = "shard_embeddings"
    config_class = ShardingConfig
    version: ClassVar[int] = 1

    @classmethod
    def unavailable(cls, target: Target) -> str | None:
        if target.devices < 2:
            return f"target {target.name} has one device: nothing to shard (plan for --devices 2 or more)"
        return None

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg = self.config
        devices = cfg.devices or target.devices
        if devices < 2:
            return PassResult.skipped(program, SkipKind.UNAVAILABLE, "one device: nothing to shard")
        if cfg.table_format != "model" and cfg.table_format not in TABLE_FORMATS:
            raise PassError(
                f"shard_embeddings: table_format {cfg.table_format!r} is not 'model' or one of {TABLE_FORMATS}"
            )
        # nn.Embedding tables are planned and looked up like EmbeddingBag ones: as bags of one id each
        converted = [n for n in list(program.graph.nodes) if embedding_lookup(program, n) is not None]
        for node in converted:
            embedding_as_bag(program, node)
        if converted:
            program = finish_rewrite(program)
            program.recompile()
        tables, lookups, refused = program_tables(program, cfg.table_format)
        if not tables:
            return PassResult.skipped(
                program, SkipKind.NOT_APPLICABLE, "no shardable EmbeddingBag tables", not_sharded=refused
            )
        sharded = {t.name for t in tables} | {lk.scale for lk in lookups if lk.scale}
        # every device holds the dense part (data-parallel) and the activations of its batch
        reserved = sum(
            t.numel() * t.element_size()
            for name, t in program.graph_module.state_dict().items()
            if name not in sharded
        )
        cost = estimate(program, target, candidates=cfg.batch_per_device)
        dense_s = sum(o.time_s for o in cost.ops if "embedding" not in o.op)
        plan = plan_sharding(
            tables,
            Topology.uniform(target.hardware, devices),
            PlanWorkload(batch_per_device=cfg.batch_per_device, dense_s=dense_s),
            PlannerConfig(
                sharding_types=cfg.allowed_types or parse_sharding_types(cfg.sharding_types),
                memory_margin=cfg.memory_margin,
                reserved_bytes=float(reserved + cost.activation_bytes),
                constraints=dict(cfg.constraints),
            ),
        )
        program.metadata["sharding_plan"] = plan.to_dict()
        stats: dict[str, Any] = dict(plan.summary())
        stats["tables_by_kind"] = plan.kinds
        stats["embedding_lookups_as_bags"] = len(converted)
        if refused:
            stats["not_sharded"] = refused
        return PassResult(program, True, stats)
