"""Deep Interest Network (Zhou et al., 2018) with a masked-softmax local activation unit.

The candidate item (query) attends over the user's behaviour sequence ``hist_items`` / ``hist_cats``
[B, L] (0 = padding) of which the first ``hist_len`` [B] entries are valid; the activation unit is an
MLP over ``[q, k, q - k, q * k]``. ``user_profile`` [B, 2] ids and the history are request-level,
``target_item`` / ``target_cat`` [B] are per candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

ITEMS = 1000
CATS = 50
PROFILE_DIMS = (16, 40)  # age bucket, city
HIST_LEN = 12
EMBED_DIM = 8


class LocalActivationUnit(nn.Module):
    def __init__(self, dim: int, hidden: Sequence[int] = (32, 16)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 4 * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Sigmoid()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand(-1, keys.size(1), -1)
        scores = self.mlp(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)  # [B, L]
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)


class DeepInterestNetwork(nn.Module):
    def __init__(self, items: int, cats: int, profile_dims: Sequence[int], dim: int) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(items, dim, padding_idx=0)
        self.cat_emb = nn.Embedding(cats, dim, padding_idx=0)
        self.profile_embs = nn.ModuleList([nn.Embedding(n, dim) for n in profile_dims])
        self.attention = LocalActivationUnit(2 * dim)
        width = len(profile_dims) * dim + 2 * dim + 2 * dim
        self.mlp = nn.Sequential(
            nn.Linear(width, 64), nn.PReLU(), nn.Linear(64, 32), nn.PReLU(), nn.Linear(32, 1)
        )

    def forward(
        self,
        user_profile: torch.Tensor,
        hist_items: torch.Tensor,
        hist_cats: torch.Tensor,
        hist_len: torch.Tensor,
        target_item: torch.Tensor,
        target_cat: torch.Tensor,
    ) -> torch.Tensor:
        keys = torch.cat([self.item_emb(hist_items), self.cat_emb(hist_cats)], dim=-1)  # [B, L, 2d]
        query = torch.cat([self.item_emb(target_item), self.cat_emb(target_cat)], dim=-1)  # [B, 2d]
        positions = torch.arange(hist_items.size(1), device=hist_items.device)
        mask = positions.unsqueeze(0) < hist_len.unsqueeze(1)
        interest = self.attention(query, keys, mask)
        profile = [emb(user_profile[:, i]) for i, emb in enumerate(self.profile_embs)]
        return torch.sigmoid(self.mlp(torch.cat([*profile, interest, query], dim=-1))).squeeze(-1)


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = DeepInterestNetwork(ITEMS, CATS, PROFILE_DIMS, EMBED_DIM)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        hist_len = torch.randint(1, HIST_LEN + 1, (r,), generator=g)  # every user has clicked something
        valid = torch.arange(HIST_LEN) < hist_len.unsqueeze(1)
        hist_items = torch.where(valid, zipf_ids(ITEMS, (r, HIST_LEN), generator=g, low=1), 0)
        hist_cats = torch.where(valid, hist_items % (CATS - 1) + 1, 0)
        profile = torch.stack([zipf_ids(d, r, generator=g) for d in PROFILE_DIMS], 1)
        target_item = zipf_ids(ITEMS, n, generator=g, low=1)
        inputs = {
            "user_profile": per_request(profile, counts),
            "hist_items": per_request(hist_items, counts),
            "hist_cats": per_request(hist_cats, counts),
            "hist_len": per_request(hist_len, counts),
            "target_item": target_item,
            "target_cat": target_item % (CATS - 1) + 1,
        }
        return RequestBatch(inputs, offsets_from_counts(counts))

    spec = RequestSpec(request_inputs=("user_profile", "hist_items", "hist_cats", "hist_len"))
    return Workload(
        "din", model.eval(), spec, make_batch, description="DIN: masked-softmax target attention over history"
    )
