"""Embedding sharding: plan tables across devices (``planner``) and run the plan (``runtime``).

The plan is plain data (``Plan``, JSON); the planner's roles (enumerator, proposer, partitioner,
perf model in ``cost``) are separate functions, as in TorchRec's planner.
"""

from __future__ import annotations

from codesign.sharding.planner import LowerBound, PlannerConfig, enumerate_options, lower_bound, plan_sharding
from codesign.sharding.types import (
    POOLING_MODES,
    SHARDING_TYPES,
    TABLE_FORMATS,
    Plan,
    PlanWorkload,
    Shard,
    TableSpec,
    Topology,
)

__all__ = [
    "POOLING_MODES",
    "SHARDING_TYPES",
    "TABLE_FORMATS",
    "LowerBound",
    "Plan",
    "PlanWorkload",
    "PlannerConfig",
    "Shard",
    "TableSpec",
    "Topology",
    "enumerate_options",
    "lower_bound",
    "plan_sharding",
]
