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

from typing import Any

from codesign.passes.fusion.common import REORDERED
from codesign.passes.fusion.embedding_grouping import EmbeddingGrouping, EmbeddingGroupingConfig
from codesign.passes.fusion.epilogue import EPILOGUE_MODES, LinearEpilogueConfig, LinearEpilogueFusion
from codesign.passes.fusion.parallel import ParallelLinearConfig, ParallelLinearFusion
from codesign.passes.fusion.shared_input import SharedInputLinearConfig, SharedInputLinearFusion
from codesign.passes.manager import Pass

__all__ = [
    "EPILOGUE_MODES",
    "REORDERED",
    "EmbeddingGrouping",
    "EmbeddingGroupingConfig",
    "LinearEpilogueConfig",
    "LinearEpilogueFusion",
    "ParallelLinearConfig",
    "ParallelLinearFusion",
    "SharedInputLinearConfig",
    "SharedInputLinearFusion",
    "fusion_passes",
]


def fusion_passes() -> list[Pass[Any]]:
    """The fusion pipeline in its useful order: lookups, shared inputs, parallel towers, epilogues."""
    return [EmbeddingGrouping(), SharedInputLinearFusion(), ParallelLinearFusion(), LinearEpilogueFusion()]
