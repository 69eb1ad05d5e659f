"""xDeepFM's compressed interaction network (Lian et al., 2018): explicit vector-wise feature crosses.

Field embeddings [B, m, d]; layer k takes the outer product of its H_k feature maps with the m base
fields per embedding dimension (``einsum('bhd,bmd->bhmd')``), flattens the (h, m) pairs and compresses
them with a 1x1 ``Conv1d``; each layer's maps are sum-pooled over d. A linear part and a small DNN sit
beside it. ``user`` [B, 3] ids are request-level, ``item`` [B, 3] ids are per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

USER_DIMS = (600, 30, 7)  # user id, city, weekday of the request
ITEM_DIMS = (900, 45, 12)  # item id, category, price bucket
EMBED_DIM = 8


class CIN(nn.Module):
    def __init__(self, num_fields: int, layer_sizes: Sequence[int], split_half: bool = True) -> None:
        super().__init__()
        self.split_half = split_half
        self.convs = nn.ModuleList()
        self.field_nums = [num_fields]
        prev = num_fields
        for i, size in enumerate(layer_sizes):
            self.convs.append(nn.Conv1d(prev * num_fields, size, kernel_size=1))
            if split_half and i != len(layer_sizes) - 1:
                size //= 2
            prev = size
            self.field_nums.append(size)
        self.out_features = sum(self.field_nums[1:-1]) + layer_sizes[-1] if split_half else sum(layer_sizes)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x0.shape
        hidden = [x0]
        pooled = []
        for i, conv in enumerate(self.convs):
            z = torch.einsum("bhd,bmd->bhmd", hidden[-1], x0)
            z = z.reshape(batch, hidden[-1].shape[1] * x0.shape[1], dim)
            out = F.relu(conv(z))  # [B, H_{k+1}, d]
            if self.split_half and i != len(self.convs) - 1:
                next_hidden, direct = torch.split(out, out.shape[1] // 2, dim=1)
            else:
                next_hidden, direct = out, out
            pooled.append(direct.sum(dim=2))
            hidden.append(next_hidden)
        return torch.cat(pooled, dim=1)


class XDeepFM(nn.Module):
    def __init__(self, field_dims: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList([nn.Embedding(n, embed_dim) for n in field_dims])
        self.linear = nn.ModuleList([nn.Embedding(n, 1) for n in field_dims])
        self.cin = CIN(len(field_dims), layer_sizes=(16, 16, 8))
        width = len(field_dims) * embed_dim
        self.dnn = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 1))
        self.cin_out = nn.Linear(self.cin.out_features, 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([user, item], dim=1)
        fields = torch.stack([emb(ids[:, i]) for i, emb in enumerate(self.embeddings)], dim=1)
        linear = sum(w(ids[:, i]) for i, w in enumerate(self.linear))
        logit = linear + self.cin_out(self.cin(fields)) + self.dnn(fields.flatten(1))
        return torch.sigmoid(logit).squeeze(1)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = XDeepFM((*USER_DIMS, *ITEM_DIMS), EMBED_DIM)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user = torch.stack([zipf_ids(d, r, generator=g) for d in USER_DIMS], 1)
        item = torch.stack([zipf_ids(d, n, generator=g) for d in ITEM_DIMS], 1)
        return RequestBatch({"user": per_request(user, counts), "item": item}, offsets_from_counts(counts))

    spec = RequestSpec(request_inputs=("user",))
    return Workload(
        "cin", model.eval(), spec, make_batch, description="xDeepFM CIN: einsum outer products + Conv1d"
    )
