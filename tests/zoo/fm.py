"""Factorization machine (Rendle, 2010): one embedding table per field, 2-D lookups on a [B, F] id tensor.

``x`` holds one id per field; the user fields (user id, age bucket, city) come first and are the
same on every candidate row of a request, the item fields (item id, category, brand) follow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

FIELD_DIMS = (1000, 10, 50, 800, 30, 60)  # user id, age bucket, city | item id, category, brand
USER_FIELDS = 3
EMBED_DIM = 8


class FactorizationMachine(nn.Module):
    def __init__(self, field_dims: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList([nn.Embedding(n, embed_dim) for n in field_dims])
        self.weights = nn.ModuleList([nn.Embedding(n, 1) for n in field_dims])
        self.bias = nn.Parameter(torch.zeros(1))
        for emb in self.embeddings:
            nn.init.normal_(emb.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embs = [emb(x[:, i]) for i, emb in enumerate(self.embeddings)]
        e = torch.stack(embs, 1)  # [B, F, d]
        second_order = 0.5 * (torch.sum(e, 1) ** 2 - torch.sum(e**2, 1)).sum(1)
        first_order = torch.cat([w(x[:, i]) for i, w in enumerate(self.weights)], 1).sum(1) + self.bias
        return torch.sigmoid(first_order + second_order)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = FactorizationMachine(FIELD_DIMS, EMBED_DIM)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user = torch.stack([zipf_ids(d, r, generator=g) for d in FIELD_DIMS[:USER_FIELDS]], 1)
        item = torch.stack([zipf_ids(d, n, generator=g) for d in FIELD_DIMS[USER_FIELDS:]], 1)
        x = torch.cat([per_request(user, counts), item], 1)
        return RequestBatch({"x": x}, offsets_from_counts(counts))

    spec = RequestSpec(request_columns={"x": ((0, USER_FIELDS),)})
    return Workload(
        "fm", model.eval(), spec, make_batch, description="factorization machine, per-field nn.Embedding"
    )
