"""Table sets to plan: the MLPerf DLRMv2 tables and synthetic trillion-parameter sets.

Published shapes are data (cited); the synthetic set follows the heavy tail real ranking models
show: a few huge id spaces (users, items) and a long tail of small categorical features.
"""

from __future__ import annotations

import random

from codesign.sharding.types import TableSpec

__all__ = ["MLPERF_DLRMV2_HOT", "MLPERF_DLRMV2_ROWS", "mlperf_dlrmv2_tables", "synthetic_tables"]

# MLPerf Inference/Training DLRMv2 (DCNv2 on Criteo 1TB, multi-hot): rows per table and the
# multi-hot size (ids per sample) of each of the 26 categorical features; embedding dim 128.
MLPERF_DLRMV2_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
MLPERF_DLRMV2_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)


def mlperf_dlrmv2_tables(dim: int = 128, storage: str = "fp32") -> list[TableSpec]:
    """The 26 DLRMv2 tables (``cat_0`` ... ``cat_25``), each looked up once per candidate."""
    return [
        TableSpec(f"cat_{i}", rows, dim, float(hot), storage=storage)
        for i, (rows, hot) in enumerate(zip(MLPERF_DLRMV2_ROWS, MLPERF_DLRMV2_HOT, strict=True))
    ]


def synthetic_tables(
    count: int = 1000,
    params: float = 1e12,
    alpha: float = 1.0,
    dims: tuple[int, ...] = (64, 128, 256),
    max_ids: int = 64,
    storage: str = "fp32",
    seed: int = 0,
) -> list[TableSpec]:
    """``count`` tables whose sizes follow a Zipf law (table i has rows ∝ i^-alpha) scaled to
    ``params`` parameters in all; dims drawn from ``dims``, ids per sample log-uniform in
    [1, max_ids] (independent of size: a small table can be read hard)."""
    rng = random.Random(seed)
    dim_of = [rng.choice(dims) for _ in range(count)]
    weight = [(i + 1) ** -alpha for i in range(count)]
    scale = params / sum(w * d for w, d in zip(weight, dim_of, strict=True))
    tables = []
    for i in range(count):
        rows = max(2, round(weight[i] * scale))
        ids = round(max_ids ** rng.random(), 2)
        tables.append(TableSpec(f"t{i:04d}", rows, dim_of[i], ids, storage=storage))
    return tables
