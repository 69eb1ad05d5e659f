"""DCN-V2 (Wang et al., 2021): x_{l+1} = x0 * (W_l x_l + b_l) + x_l with full-matrix nn.Linear layers.

Inputs come as a feature dict, the way feature-store readers hand them over: ``features["user_id"]``,
``features["user_geo"]``, ``features["user_dense"]`` (request-level) and ``features["item_id"]``,
``features["item_tags"]`` [B, 3] multi-id, ``features["item_dense"]``. Embeddings are looked up in one
table per feature and flattened with ``reshape``; a stacked deep network follows the cross layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

VOCABS = {"user_id": 1000, "user_geo": 64, "item_id": 800, "item_tags": 120}
ITEM_TAGS = 3
USER_DENSE = 3
ITEM_DENSE = 2
EMBED_DIM = 8


class CrossLayerV2(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNv2(nn.Module):
    def __init__(self, vocabs: dict[str, int], embed_dim: int, num_cross: int, deep: Sequence[int]) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.tables = nn.ModuleDict({name: nn.Embedding(rows, embed_dim) for name, rows in vocabs.items()})
        width = (3 + ITEM_TAGS) * embed_dim + USER_DENSE + ITEM_DENSE
        self.cross = nn.ModuleList([CrossLayerV2(width) for _ in range(num_cross)])
        layers: list[nn.Module] = []
        for h in deep:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        batch_size = features["item_id"].shape[0]
        sparse = [
            self.tables["user_id"](features["user_id"]),
            self.tables["user_geo"](features["user_geo"]),
            self.tables["item_id"](features["item_id"]),
            self.tables["item_tags"](features["item_tags"]).reshape(batch_size, -1),
        ]
        x0 = torch.cat([*sparse, features["user_dense"], features["item_dense"]], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.head(self.deep(x)).squeeze(1)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = DCNv2(VOCABS, EMBED_DIM, num_cross=2, deep=(64, 32))

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        features = {
            "user_id": per_request(zipf_ids(VOCABS["user_id"], r, generator=g), counts),
            "user_geo": per_request(zipf_ids(VOCABS["user_geo"], r, generator=g), counts),
            "user_dense": per_request(torch.randn(r, USER_DENSE, generator=g), counts),
            "item_id": zipf_ids(VOCABS["item_id"], n, generator=g),
            "item_tags": zipf_ids(VOCABS["item_tags"], (n, ITEM_TAGS), generator=g),
            "item_dense": torch.rand(n, ITEM_DENSE, generator=g),
        }
        return RequestBatch({"features": features}, offsets_from_counts(counts))

    spec = RequestSpec(request_inputs=("features.user_id", "features.user_geo", "features.user_dense"))
    return Workload(
        "dcn_v2", model.eval(), spec, make_batch, description="DCN-V2 cross layers on a feature dict"
    )
