"""Target attention (DIN, Zhou et al. 2018): each candidate attends over the user's behaviour history.

Separate tensors per feature group, as DIN implementations take them: ``history`` / ``history_cat``
[N, L] (0 = padding), ``profile`` [N, 4] user profile ids, ``cand_item`` / ``cand_cat`` [N] and
``context`` [N, 8] dense candidate context. User features repeat on every candidate row.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

SIZES = {
    "tiny": {"dim": 8, "items": 500, "cats": 20, "history": 8, "attn": (16, 8), "top": (32, 16)},
    "small": {"dim": 32, "items": 50_000, "cats": 500, "history": 50, "attn": (80, 40), "top": (200, 80)},
    "large": {"dim": 64, "items": 500_000, "cats": 2_000, "history": 200, "attn": (80, 40), "top": (200, 80)},
}
PROFILE_FIELDS = 4
PROFILE_ROWS = 1000
CONTEXT = 8


class AttentionUnit(nn.Module):
    """DIN's activation unit: an MLP over [h, c, h - c, h * c] gives one weight per history item."""

    def __init__(self, width: int, hidden: Sequence[int]) -> None:
        super().__init__()
        sizes = [4 * width, *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.PReLU()]
        layers.append(nn.Linear(sizes[-1], 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, hist: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = cand.unsqueeze(1).expand_as(hist)
        w = self.mlp(torch.cat([hist, c, hist - c, hist * c], dim=-1)).squeeze(-1)
        w = w * mask  # DIN keeps raw weights (no softmax) so intensity of interest is preserved
        return (w.unsqueeze(-1) * hist).sum(dim=1)


class DIN(nn.Module):
    def __init__(self, dim: int, items: int, cats: int, attn: Sequence[int], top: Sequence[int]) -> None:
        super().__init__()
        self.item = nn.Embedding(items, dim, padding_idx=0)
        self.cat = nn.Embedding(cats, dim, padding_idx=0)
        self.profile = nn.EmbeddingBag(PROFILE_ROWS, dim, mode="sum")
        self.attention = AttentionUnit(2 * dim, attn)
        sizes = [dim + 2 * dim + 2 * dim + CONTEXT, *top]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.PReLU()]
        layers.append(nn.Linear(sizes[-1], 1))
        self.top = nn.Sequential(*layers)

    def forward(
        self,
        history: torch.Tensor,
        history_cat: torch.Tensor,
        profile: torch.Tensor,
        cand_item: torch.Tensor,
        cand_cat: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        hist = torch.cat([self.item(history), self.cat(history_cat)], dim=-1)
        cand = torch.cat([self.item(cand_item), self.cat(cand_cat)], dim=-1)
        interest = self.attention(hist, cand, (history > 0).to(hist.dtype))
        user = self.profile(profile)
        logit = self.top(torch.cat([user, interest, cand, context], dim=-1))
        return torch.sigmoid(logit).squeeze(-1)


def build(size: str = "tiny", seed: int = 0) -> Workload:
    cfg = SIZES[size]
    torch.manual_seed(seed)
    dim, items, cats, length = (int(cfg[k]) for k in ("dim", "items", "cats", "history"))  # type: ignore[call-overload]
    model = DIN(dim, items, cats, cfg["attn"], cfg["top"]).eval()  # type: ignore[arg-type]

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        history = zipf_ids(items, (r, length), generator=g, low=1)
        valid = torch.randint(1, length + 1, (r, 1), generator=g)  # users have histories of mixed length
        history = torch.where(torch.arange(length) < valid, history, 0)
        history_cat = torch.where(history > 0, history % (cats - 1) + 1, 0)
        profile = zipf_ids(PROFILE_ROWS, (r, PROFILE_FIELDS), generator=g)
        cand_item = zipf_ids(items, n, generator=g, low=1)
        inputs = {
            "history": per_request(history, counts),
            "history_cat": per_request(history_cat, counts),
            "profile": per_request(profile, counts),
            "cand_item": cand_item,
            "cand_cat": cand_item % (cats - 1) + 1,
            "context": torch.randn(n, CONTEXT, generator=g),
        }
        return RequestBatch(inputs, offsets_from_counts(counts))

    spec = RequestSpec(request_inputs=("history", "history_cat", "profile"))
    return Workload(
        "din", model, spec, make_batch, description=f"DIN target attention ({size})", metadata={"size": size}
    )
