"""DCNv2 at the MLPerf DLRMv2 shape: dim 128, bottom 512-256-128, 3 low-rank (512) cross layers,
top 1024-1024-512-256-1, 26 multi-hot tables (row counts scaled down to fit one host).

The model takes one dict of features, as feature-store pipelines hand them over: ``dense`` [N, 13]
and ``cat_k`` [N, hot_k] with the MLPerf multi-hot sizes. User-side features (cat_0-12, dense
columns 0-5) repeat on every candidate row.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids
from codesign.sharding.tablesets import MLPERF_DLRMV2_HOT, MLPERF_DLRMV2_ROWS

# MLPerf DLRMv2 (Criteo 1TB multi-hot) table rows and multi-hot sizes.
MLPERF_ROWS = MLPERF_DLRMV2_ROWS
MLPERF_HOT = MLPERF_DLRMV2_HOT
NUM_DENSE = 13
USER_CATS = range(13)
USER_DENSE_COLS = (0, 6)

SIZES = {
    "tiny": {
        "dim": 8,
        "bottom": (16,),
        "top": (32, 16),
        "rank": 8,
        "layers": 2,
        "max_rows": 100,
        "max_hot": 4,
    },
    "small": {
        "dim": 32,
        "bottom": (128, 64),
        "top": (256, 128, 64),
        "rank": 64,
        "layers": 3,
        "max_rows": 10_000,
        "max_hot": 20,
    },
    "large": {
        "dim": 128,
        "bottom": (512, 256),
        "top": (1024, 1024, 512, 256),
        "rank": 512,
        "layers": 3,
        "max_rows": 100_000,
        "max_hot": 100,
    },
}


class LowRankCross(nn.Module):
    """x_{l+1} = x_0 * (U (V x_l) + b) + x_l (DCN-V2 low-rank cross layer)."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.v = nn.Linear(width, rank, bias=False)
        self.u = nn.Linear(rank, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.u(self.v(x)) + x


class DCNv2(nn.Module):
    def __init__(
        self, rows: Sequence[int], dim: int, bottom: Sequence[int], top: Sequence[int], rank: int, layers: int
    ) -> None:
        super().__init__()
        sizes = [NUM_DENSE, *bottom, dim]
        blocks: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        self.bottom = nn.Sequential(*blocks)
        self.tables = nn.ModuleList(nn.EmbeddingBag(r, dim, mode="sum") for r in rows)
        width = dim * (len(rows) + 1)
        self.cross = nn.ModuleList(LowRankCross(width, rank) for _ in range(layers))
        top_sizes = [width, *top, 1]
        blocks = []
        for i, (a, b) in enumerate(itertools.pairwise(top_sizes)):
            blocks.append(nn.Linear(a, b))
            if i < len(top_sizes) - 2:
                blocks.append(nn.ReLU())
        self.top = nn.Sequential(*blocks)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        dense = self.bottom(features["dense"])
        pooled = [table(features[f"cat_{k}"]) for k, table in enumerate(self.tables)]
        x0 = torch.cat([dense, *pooled], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return torch.sigmoid(self.top(x)).squeeze(-1)


def build(size: str = "tiny", seed: int = 0) -> Workload:
    cfg = SIZES[size]
    torch.manual_seed(seed)
    rows = [min(r, int(cfg["max_rows"])) for r in MLPERF_ROWS]  # type: ignore[call-overload]
    hot = [min(h, int(cfg["max_hot"])) for h in MLPERF_HOT]  # type: ignore[call-overload]
    model = DCNv2(
        rows,
        int(cfg["dim"]),
        cfg["bottom"],
        cfg["top"],  # type: ignore[arg-type]
        int(cfg["rank"]),
        int(cfg["layers"]),
    ).eval()  # type: ignore[call-overload]

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        dense = torch.rand(n, NUM_DENSE, generator=g).mul_(4).log1p_()
        dense[:, slice(*USER_DENSE_COLS)] = per_request(
            torch.rand(r, USER_DENSE_COLS[1] - USER_DENSE_COLS[0], generator=g).mul_(4).log1p_(), counts
        )
        feats: dict[str, torch.Tensor] = {"dense": dense}
        for k in range(len(rows)):
            if k in USER_CATS:
                feats[f"cat_{k}"] = per_request(zipf_ids(rows[k], (r, hot[k]), generator=g), counts)
            else:
                feats[f"cat_{k}"] = zipf_ids(rows[k], (n, hot[k]), generator=g)
        return RequestBatch({"features": feats}, offsets_from_counts(counts))

    spec = RequestSpec(
        request_inputs=tuple(f"features.cat_{k}" for k in USER_CATS),
        request_columns={"features.dense": (USER_DENSE_COLS,)},
    )
    return Workload(
        "dcnv2",
        model,
        spec,
        make_batch,
        description=f"DCNv2, MLPerf DLRMv2 shape ({size})",
        metadata={"size": size},
    )
