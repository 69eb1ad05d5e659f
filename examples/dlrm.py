"""DLRM (Naumov et al., 2019) with dot interaction on Criteo-like features: 13 dense + 26 sparse.

Inputs are written the way DLRM reference code receives them: ``dense`` [N, 13] plus per-table
EmbeddingBag ``indices`` / ``offsets`` lists (variable multi-hot bags). Flat rows: the user-side
features (dense columns 0-4, sparse features 0-12) are repeated on every candidate row.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import jagged_ids, per_request, repeat_bags

NUM_DENSE = 13
NUM_SPARSE = 26
USER_DENSE_COLS = (0, 5)
USER_SPARSE = range(13)

SIZES = {
    "tiny": {"dim": 8, "rows": 200, "bottom": (32, 16), "top": (32, 16), "max_hot": 3},
    "small": {"dim": 16, "rows": 20_000, "bottom": (128, 64), "top": (128, 64), "max_hot": 8},
    "large": {"dim": 64, "rows": 200_000, "bottom": (512, 256), "top": (512, 256), "max_hot": 20},
}


def mlp(sizes: Sequence[int], final_act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if final_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(
        self, table_rows: Sequence[int], dim: int, bottom: Sequence[int], top: Sequence[int]
    ) -> None:
        super().__init__()
        self.bottom = mlp([NUM_DENSE, *bottom, dim])
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, dim, mode="sum") for rows in table_rows)
        n = len(table_rows) + 1
        li, lj = torch.tril_indices(n, n, offset=-1)
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)
        self.top = mlp([dim + n * (n - 1) // 2, *top, 1], final_act=False)

    def forward(
        self, dense: torch.Tensor, indices: list[torch.Tensor], offsets: list[torch.Tensor]
    ) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = [table(idx, off) for table, idx, off in zip(self.tables, indices, offsets, strict=True)]
        t = torch.stack([x, *pooled], dim=1)  # [N, 27, dim]
        z = torch.bmm(t, t.transpose(1, 2))  # pairwise dot products
        interactions = z[:, self.li, self.lj]
        return torch.sigmoid(self.top(torch.cat([x, interactions], dim=1))).squeeze(-1)


def build(size: str = "tiny", seed: int = 0) -> Workload:
    cfg = SIZES[size]
    torch.manual_seed(seed)
    rows = [int(cfg["rows"]) // (1 + i % 4) + 4 for i in range(NUM_SPARSE)]  # mixed table sizes
    model = DLRM(rows, int(cfg["dim"]), cfg["bottom"], cfg["top"]).eval()  # type: ignore[arg-type]
    max_hot = int(cfg["max_hot"])

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        dense = torch.rand(n, NUM_DENSE, generator=g).mul_(4).log1p_()  # log-transformed counters
        dense[:, slice(*USER_DENSE_COLS)] = per_request(
            torch.rand(r, USER_DENSE_COLS[1] - USER_DENSE_COLS[0], generator=g).mul_(4).log1p_(), counts
        )
        indices, offsets = [], []
        for k in range(NUM_SPARSE):
            if k in USER_SPARSE:
                lengths = torch.randint(1, max_hot + 1, (r,), generator=g)
                values, _ = jagged_ids(rows[k], lengths, generator=g)
                idx, off = repeat_bags(values, lengths, counts)
            else:
                lengths = torch.randint(1, max_hot + 1, (n,), generator=g)
                idx, off = jagged_ids(rows[k], lengths, generator=g)
            indices.append(idx)
            offsets.append(off)
        return RequestBatch(
            {"dense": dense, "indices": indices, "offsets": offsets}, offsets_from_counts(counts)
        )

    spec = RequestSpec(
        request_inputs=tuple(f"indices.{k}" for k in USER_SPARSE),
        request_columns={"dense": (USER_DENSE_COLS,)},
        jagged={f"indices.{k}": f"offsets.{k}" for k in range(NUM_SPARSE)},
    )
    return Workload(
        "dlrm", model, spec, make_batch, description=f"DLRM dot interaction ({size})", metadata={"size": size}
    )
