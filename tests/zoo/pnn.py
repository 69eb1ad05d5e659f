"""Product-based neural network, inner-product variant (Qu et al., 2016).

Field embeddings [B, F, d]; every field pair (i < j) gives an inner product, picked with Python index
lists ``x[:, row] * x[:, col]``. ``user_fields`` [B, 2] ids are request-level, ``item_fields`` [B, 3]
ids per candidate; one shared table with per-field offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

USER_DIMS = (700, 12)  # user id, occupation
ITEM_DIMS = (600, 30, 18)  # movie id, genre, year bucket
EMBED_DIM = 8


class InnerProductNetwork(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_fields = x.shape[1]
        row, col = [], []
        for i in range(num_fields - 1):
            for j in range(i + 1, num_fields):
                row.append(i)
                col.append(j)
        return torch.sum(x[:, row] * x[:, col], dim=2)


class PNN(nn.Module):
    def __init__(self, field_dims: Sequence[int], dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(sum(field_dims), dim)
        self.register_buffer("offsets", torch.tensor([0, *field_dims[:-1]]).cumsum(0))
        self.pn = InnerProductNetwork()
        num_fields = len(field_dims)
        width = num_fields * dim + num_fields * (num_fields - 1) // 2
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, user_fields: torch.Tensor, item_fields: torch.Tensor) -> torch.Tensor:
        x = torch.cat([user_fields, item_fields], dim=1) + self.offsets
        emb = self.embedding(x)
        products = self.pn(emb)
        out = self.mlp(torch.cat([emb.view(-1, emb.shape[1] * emb.shape[2]), products], dim=1))
        return torch.sigmoid(out.squeeze(1))


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = PNN((*USER_DIMS, *ITEM_DIMS), EMBED_DIM, hidden=(32, 16))

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user = torch.stack([zipf_ids(d, r, generator=g) for d in USER_DIMS], 1)
        item = torch.stack([zipf_ids(d, n, generator=g) for d in ITEM_DIMS], 1)
        return RequestBatch(
            {"user_fields": per_request(user, counts), "item_fields": item}, offsets_from_counts(counts)
        )

    spec = RequestSpec(request_inputs=("user_fields",))
    return Workload("pnn", model.eval(), spec, make_batch, description="PNN: inner products via index lists")
