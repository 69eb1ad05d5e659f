"""DeepFM (Guo et al., 2017) on ONE flat float tensor, as libsvm-style pipelines hand it over.

``x`` [B, 9]: columns 0-1 user ids and 2-3 user dense features (request-level), then three item
ids and two dense item/context features. Ids are stored as floats and picked by index lists; one
shared embedding table holds every field, each field's ids shifted by its offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

FIELD_DIMS = (400, 12, 700, 50, 25)  # user id, gender/age | item id, category, seller
SPARSE_IDX = [0, 1, 4, 5, 6]
DENSE_IDX = [2, 3, 7, 8]
USER_COLUMNS = (0, 4)  # two user ids and two user dense features
EMBED_DIM = 8


class DeepFM(nn.Module):
    def __init__(
        self,
        field_dims: Sequence[int],
        sparse_idx: Sequence[int],
        dense_idx: Sequence[int],
        embed_dim: int,
        hidden: Sequence[int],
    ) -> None:
        super().__init__()
        self.sparse_idx = list(sparse_idx)
        self.dense_idx = list(dense_idx)
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(sum(field_dims), embed_dim)
        self.fc = nn.Embedding(sum(field_dims), 1)
        self.register_buffer("offsets", torch.tensor([0, *field_dims[:-1]]).cumsum(0))
        nn.init.xavier_uniform_(self.embedding.weight)
        layers: list[nn.Module] = []
        width = len(field_dims) * embed_dim + len(dense_idx)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.dnn = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.size(0)
        ids = x[:, self.sparse_idx].long() + self.offsets
        dense = x[:, self.dense_idx]
        emb = self.embedding(ids).view(B, -1, self.embed_dim)
        linear = self.fc(ids).sum(dim=1)
        fm = 0.5 * (emb.sum(dim=1).pow(2) - emb.pow(2).sum(dim=1)).sum(dim=1, keepdim=True)
        deep = self.dnn(torch.cat([emb.view(B, -1), dense], dim=1))
        return torch.sigmoid(linear + fm + deep).squeeze(1)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = DeepFM(FIELD_DIMS, SPARSE_IDX, DENSE_IDX, EMBED_DIM, hidden=(32, 16))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user = torch.stack(
            [
                zipf_ids(FIELD_DIMS[0], r, generator=g).float(),
                zipf_ids(FIELD_DIMS[1], r, generator=g).float(),
                torch.rand(r, generator=g),
                torch.randn(r, generator=g),
            ],
            1,
        )
        item = torch.stack(
            [
                zipf_ids(FIELD_DIMS[2], n, generator=g).float(),
                zipf_ids(FIELD_DIMS[3], n, generator=g).float(),
                zipf_ids(FIELD_DIMS[4], n, generator=g).float(),
                torch.rand(n, generator=g) * 3,
                torch.randn(n, generator=g),
            ],
            1,
        )
        x = torch.cat([per_request(user, counts), item], 1)
        return RequestBatch({"x": x}, offsets_from_counts(counts))

    spec = RequestSpec(request_columns={"x": (USER_COLUMNS,)})
    return Workload(
        "deepfm", model.eval(), spec, make_batch, description="DeepFM on one flat float tensor, index lists"
    )
