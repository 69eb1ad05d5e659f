"""Graph passes: each a ``Pass`` subclass with a registered config of knobs, registered by name.

Importing this package imports every pass module, so ``pass_by_name`` knows every pass.
"""

from __future__ import annotations

from typing import Any

from codesign.passes.cleanup import (
    CommonSubexpressionElimination,
    ConstantFolding,
    DeadCodeElimination,
    generic_passes,
)
from codesign.passes.fp8 import SelectiveFp8, SelectiveFp8Config
from codesign.passes.fusion import (
    EmbeddingGrouping,
    LinearEpilogueFusion,
    ParallelLinearFusion,
    SharedInputLinearFusion,
    fusion_passes,
)
from codesign.passes.manager import Pass
from codesign.passes.registry import pass_by_name, pass_names
from codesign.passes.request_sharing import RequestSharing, RequestSharingConfig
from codesign.passes.sharding import ShardEmbeddings, ShardingConfig

__all__ = [
    "CommonSubexpressionElimination",
    "ConstantFolding",
    "DeadCodeElimination",
    "EmbeddingGrouping",
    "LinearEpilogueFusion",
    "ParallelLinearFusion",
    "RequestSharing",
    "RequestSharingConfig",
    "SelectiveFp8",
    "SelectiveFp8Config",
    "ShardEmbeddings",
    "ShardingConfig",
    "SharedInputLinearFusion",
    "all_passes",
    "default_passes",
    "fusion_passes",
    "generic_passes",
    "pass_by_name",
    "pass_names",
]


def all_passes() -> list[Pass[Any]]:
    """Every optimization in order: share request work, merge the duplicates it leaves, FP8 where
    the quality budget allows, plan embedding sharding (multi-device targets; before grouping,
    which then keeps sharded tables apart), fuse, clean up. Search chooses among these."""
    return [
        RequestSharing(),
        CommonSubexpressionElimination(),
        SelectiveFp8(),
        ShardEmbeddings(),
        *fusion_passes(),
        *generic_passes(),
    ]


def default_passes() -> list[Pass[Any]]:
    """The pipeline ``compile`` runs when given none: every pass that keeps numerics exact
    (lossy ones such as ``selective_fp8`` are opt-in)."""
    return [p for p in all_passes() if p.enabled_by_default]
