"""Neural factorization machine (He & Chua, 2017): bi-interaction pooling feeding an MLP.

libFM-style input: ``feat_ids`` [B, F] and ``feat_values`` [B, F] (1.0 for categorical fields, the
value for numeric ones); the first three fields are the user's (request-level column ranges of both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

FEATURES = 1000  # one global feature-id space, as in libFM files
FIELDS = 7
USER_FIELDS = 3
EMBED_DIM = 16


class NFM(nn.Module):
    def __init__(self, num_features: int, dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_features, dim)
        self.linear = nn.Embedding(num_features, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.embedding.weight, std=0.1)
        layers: list[nn.Module] = [nn.BatchNorm1d(dim), nn.Dropout(0.2)]
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(0.2)]
            width = h
        layers.append(nn.Linear(width, 1, bias=False))
        self.deep = nn.Sequential(*layers)

    def forward(self, feat_ids: torch.Tensor, feat_values: torch.Tensor) -> torch.Tensor:
        v = self.embedding(feat_ids) * feat_values.unsqueeze(-1)  # [B, F, d]
        bi_interaction = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1))  # [B, d]
        linear = (self.linear(feat_ids).squeeze(-1) * feat_values).sum(dim=1, keepdim=True) + self.bias
        return (linear + self.deep(bi_interaction)).squeeze(-1)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = NFM(FEATURES, EMBED_DIM, hidden=(32, 16))
    with torch.no_grad():
        bn = model.deep[0]
        assert isinstance(bn, nn.BatchNorm1d)
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user_ids = zipf_ids(FEATURES, (r, USER_FIELDS), generator=g)
        item_ids = zipf_ids(FEATURES, (n, FIELDS - USER_FIELDS), generator=g)
        user_values = torch.cat([torch.ones(r, USER_FIELDS - 1), torch.rand(r, 1, generator=g)], 1)
        item_values = torch.cat([torch.ones(n, 2), torch.rand(n, FIELDS - USER_FIELDS - 2, generator=g)], 1)
        inputs = {
            "feat_ids": torch.cat([per_request(user_ids, counts), item_ids], 1),
            "feat_values": torch.cat([per_request(user_values, counts), item_values], 1),
        }
        return RequestBatch(inputs, offsets_from_counts(counts))

    user = ((0, USER_FIELDS),)
    spec = RequestSpec(request_columns={"feat_ids": user, "feat_values": user})
    return Workload("nfm", model.eval(), spec, make_batch, description="NFM: bi-interaction pooling + MLP")
