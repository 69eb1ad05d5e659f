"""Deep & Cross Network v1 (Wang et al., 2017): x_{l+1} = x0 * (x_l . w_l) + b_l + x_l beside an MLP.

The cross layer's weight is a vector and x_l . w_l is written with ``torch.tensordot`` over the last
dimension, as the reference implementations do. Inputs: ``user_ids`` [B, 2] (request-level),
``item_ids`` [B, 2] and ``dense`` [B, 4] candidate/context features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

USER_DIMS = (900, 16)  # user id, user segment
ITEM_DIMS = (700, 40)  # item id, category
NUM_DENSE = 4
EMBED_DIM = 8


class CrossNet(nn.Module):
    def __init__(self, in_features: int, layer_num: int = 2) -> None:
        super().__init__()
        self.kernels = nn.ParameterList(
            [
                nn.Parameter(nn.init.xavier_normal_(torch.empty(in_features, 1)).squeeze(1))
                for _ in range(layer_num)
            ]
        )
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(in_features)) for _ in range(layer_num)])

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x_l = x0
        for w, b in zip(self.kernels, self.bias, strict=True):
            xl_w = torch.tensordot(x_l, w, dims=([-1], [0]))  # [B]
            x_l = x0 * xl_w.unsqueeze(-1) + b + x_l
        return x_l


class DCN(nn.Module):
    def __init__(
        self, user_dims: Sequence[int], item_dims: Sequence[int], num_dense: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.user_embs = nn.ModuleList([nn.Embedding(n, embed_dim) for n in user_dims])
        self.item_embs = nn.ModuleList([nn.Embedding(n, embed_dim) for n in item_dims])
        width = (len(user_dims) + len(item_dims)) * embed_dim + num_dense
        self.cross = CrossNet(width, layer_num=3)
        self.deep = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.out = nn.Linear(width + 32, 1)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        embs = [e(user_ids[:, i]) for i, e in enumerate(self.user_embs)]
        embs += [e(item_ids[:, i]) for i, e in enumerate(self.item_embs)]
        x0 = torch.cat([*embs, dense], dim=-1)
        logit = self.out(torch.cat([self.cross(x0), self.deep(x0)], dim=-1))
        return torch.sigmoid(logit).squeeze(-1)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = DCN(USER_DIMS, ITEM_DIMS, NUM_DENSE, EMBED_DIM)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user_ids = torch.stack([zipf_ids(d, r, generator=g) for d in USER_DIMS], 1)
        item_ids = torch.stack([zipf_ids(d, n, generator=g) for d in ITEM_DIMS], 1)
        return RequestBatch(
            {
                "user_ids": per_request(user_ids, counts),
                "item_ids": item_ids,
                "dense": torch.randn(n, NUM_DENSE, generator=g),
            },
            offsets_from_counts(counts),
        )

    spec = RequestSpec(request_inputs=("user_ids",))
    return Workload(
        "dcn_v1", model.eval(), spec, make_batch, description="DCN v1 cross network with torch.tensordot"
    )
