"""AutoInt (Song et al., 2019): multi-head self-attention over the field axis, with residual connections.

Every feature becomes a d-dim field vector: ids through embeddings, each dense value scales a learnt
vector. ``sparse`` [B, 5] ids with the user's two fields first (request-level), ``dense`` [B, 2]
candidate features. The interacting layers are written as the common reference code has them
(``tensordot`` projections, heads split with ``torch.split``/``stack``, ``einsum`` scores);
``build(attention="torch")`` uses ``nn.MultiheadAttention(batch_first=True)`` instead. The field
vectors are then flattened into a small MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

SPARSE_DIMS = (800, 24, 500, 60, 10)  # user id, user country | item id, category, media type
USER_FIELDS = 2
NUM_DENSE = 2
EMBED_DIM = 16
HEADS = 2


class InteractingLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.att_embedding_size = dim // heads
        self.W_Query = nn.Parameter(torch.empty(dim, dim))
        self.W_key = nn.Parameter(torch.empty(dim, dim))
        self.W_Value = nn.Parameter(torch.empty(dim, dim))
        self.W_Res = nn.Parameter(torch.empty(dim, dim))
        for w in (self.W_Query, self.W_key, self.W_Value, self.W_Res):
            nn.init.normal_(w, std=0.1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        querys = torch.tensordot(inputs, self.W_Query, dims=([-1], [0]))  # [B, F, d]
        keys = torch.tensordot(inputs, self.W_key, dims=([-1], [0]))
        values = torch.tensordot(inputs, self.W_Value, dims=([-1], [0]))
        querys = torch.stack(torch.split(querys, self.att_embedding_size, dim=2))  # [H, B, F, d/H]
        keys = torch.stack(torch.split(keys, self.att_embedding_size, dim=2))
        values = torch.stack(torch.split(values, self.att_embedding_size, dim=2))
        inner_product = torch.einsum("bnik,bnjk->bnij", querys, keys)  # [H, B, F, F]
        attn_scores = F.softmax(inner_product, dim=-1)
        result = torch.matmul(attn_scores, values)  # [H, B, F, d/H]
        result = torch.cat(torch.split(result, 1), dim=-1).squeeze(dim=0)  # [B, F, d]
        result = result + torch.tensordot(inputs, self.W_Res, dims=([-1], [0]))
        return F.relu(result)


class TorchInteractingLayer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.residual = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return F.relu(out + self.residual(x))


class AutoInt(nn.Module):
    def __init__(
        self,
        sparse_dims: Sequence[int],
        num_dense: int,
        dim: int,
        heads: int,
        layers: int,
        attention: str = "manual",
    ) -> None:
        super().__init__()
        layer = {"manual": InteractingLayer, "torch": TorchInteractingLayer}[attention]
        self.embeddings = nn.ModuleList([nn.Embedding(n, dim) for n in sparse_dims])
        self.dense_vectors = nn.Parameter(torch.randn(num_dense, dim) * 0.1)
        self.layers = nn.Sequential(*[layer(dim, heads) for _ in range(layers)])
        num_fields = len(sparse_dims) + num_dense
        self.mlp = nn.Sequential(nn.Linear(num_fields * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        fields = [emb(sparse[:, i]) for i, emb in enumerate(self.embeddings)]
        x = torch.cat([torch.stack(fields, dim=1), dense.unsqueeze(-1) * self.dense_vectors], dim=1)
        x = self.layers(x)  # [B, F, d]
        return torch.sigmoid(self.mlp(x.flatten(start_dim=1))).squeeze(-1)


def build(seed: int = 0, attention: str = "manual") -> Workload:
    """``attention="torch"``: the interacting layers use ``nn.MultiheadAttention`` instead."""
    torch.manual_seed(seed)
    model = AutoInt(SPARSE_DIMS, NUM_DENSE, EMBED_DIM, HEADS, layers=2, attention=attention)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user = torch.stack([zipf_ids(d, r, generator=g) for d in SPARSE_DIMS[:USER_FIELDS]], 1)
        item = torch.stack([zipf_ids(d, n, generator=g) for d in SPARSE_DIMS[USER_FIELDS:]], 1)
        return RequestBatch(
            {
                "sparse": torch.cat([per_request(user, counts), item], 1),
                "dense": torch.randn(n, NUM_DENSE, generator=g),
            },
            offsets_from_counts(counts),
        )

    spec = RequestSpec(request_columns={"sparse": ((0, USER_FIELDS),)})
    name = {"manual": "autoint", "torch": "autoint_mha"}[attention]
    return Workload(
        name, model.eval(), spec, make_batch, description=f"AutoInt: {attention} self-attention over fields"
    )
