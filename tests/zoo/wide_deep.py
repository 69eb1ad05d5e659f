"""Wide & Deep (Cheng et al., 2016): a linear model over one-hot ids beside an MLP over embeddings + dense.

``sparse`` [B, S] ids (user fields first), ``dense`` [B, D] floats (user features first). The deep
input is built the way DeepCTR-style code does: per-field embeddings [B, 1, d] and per-feature dense
columns [B, 1], each list concatenated and flattened.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

SPARSE_DIMS = (500, 20, 8, 600, 40)  # user id, region, device | item id, category
USER_SPARSE = 3
NUM_DENSE = 4  # user activity, user tenure | item price, item age
USER_DENSE = 2
EMBED_DIM = 8


class WideAndDeep(nn.Module):
    def __init__(
        self, sparse_dims: Sequence[int], num_dense: int, embed_dim: int, hidden: Sequence[int]
    ) -> None:
        super().__init__()
        self.embeds = nn.ModuleList([nn.Embedding(n, embed_dim) for n in sparse_dims])
        # the wide part: one weight per (field, id), i.e. a linear model over the one-hot encoding
        self.wide = nn.Embedding(sum(sparse_dims), 1)
        starts = torch.tensor([0, *sparse_dims[:-1]]).cumsum(0)
        self.register_buffer("field_starts", starts)
        self.wide_dense = nn.Linear(num_dense, 1)
        layers: list[nn.Module] = []
        width = len(sparse_dims) * embed_dim + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(0.1)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.deep = nn.Sequential(*layers)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        sparse_embs = [emb(sparse[:, i : i + 1]) for i, emb in enumerate(self.embeds)]  # [B, 1, d] each
        dense_values = [dense[:, i : i + 1] for i in range(dense.shape[1])]  # [B, 1] each
        dnn_input = torch.cat(
            [torch.flatten(torch.cat(sparse_embs, 1), 1), torch.flatten(torch.cat(dense_values, 1), 1)], -1
        )
        wide_logit = self.wide(sparse + self.field_starts).sum(1) + self.wide_dense(dense)
        return torch.sigmoid(wide_logit + self.deep(dnn_input)).squeeze(1)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = WideAndDeep(SPARSE_DIMS, NUM_DENSE, EMBED_DIM, hidden=(64, 32))

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user_ids = torch.stack([zipf_ids(d, r, generator=g) for d in SPARSE_DIMS[:USER_SPARSE]], 1)
        item_ids = torch.stack([zipf_ids(d, n, generator=g) for d in SPARSE_DIMS[USER_SPARSE:]], 1)
        user_dense = torch.rand(r, USER_DENSE, generator=g)
        item_dense = torch.randn(n, NUM_DENSE - USER_DENSE, generator=g)
        return RequestBatch(
            {
                "sparse": torch.cat([per_request(user_ids, counts), item_ids], 1),
                "dense": torch.cat([per_request(user_dense, counts), item_dense], 1),
            },
            offsets_from_counts(counts),
        )

    spec = RequestSpec(request_columns={"sparse": ((0, USER_SPARSE),), "dense": ((0, USER_DENSE),)})
    return Workload(
        "wide_deep", model.eval(), spec, make_batch, description="Wide & Deep, cat/flatten deep input"
    )
