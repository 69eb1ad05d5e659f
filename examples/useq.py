"""LLM-scale user-sequence ranker: a transformer encoder over a long user history + a candidate tower.

Scored naively (one flat row per candidate, history repeated) the ``large`` size costs ~10 GFLOPs
per candidate, almost all of it in the user-history encoder: the case request-centric computation
exists for. Inputs: ``history`` / ``actions`` [N, L] ids, ``user_dense`` [N, 16] (user side, repeated
per candidate), ``cand_item`` [N] and ``cand_dense`` [N, 8].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

SIZES = {
    "tiny": {"dim": 16, "heads": 2, "layers": 1, "history": 8, "items": 500},
    "small": {"dim": 64, "heads": 4, "layers": 2, "history": 64, "items": 20_000},
    "medium": {"dim": 256, "heads": 4, "layers": 2, "history": 256, "items": 50_000},
    "large": {"dim": 512, "heads": 8, "layers": 3, "history": 512, "items": 100_000},
}
ACTIONS = 8
USER_DENSE = 16
CAND_DENSE = 8


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block (self-attention + GELU FFN)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.proj(attn)
        return x + self.ffn(self.norm2(x))


class UserSequenceRanker(nn.Module):
    """``keep`` / ``depth`` make a cheaper variant with the same weights and inputs: it reads only
    the last ``keep`` history items through the first ``depth`` encoder blocks."""

    def __init__(
        self,
        dim: int,
        heads: int,
        layers: int,
        history: int,
        items: int,
        keep: int | None = None,
        depth: int | None = None,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.keep = history if keep is None else keep
        self.depth = layers if depth is None else depth
        if not (1 <= self.keep <= history and 0 <= self.depth <= layers):
            raise ValueError(f"keep must be in 1..{history} and depth in 0..{layers}, got {keep}, {depth}")
        self.item = nn.Embedding(items, dim)
        self.action = nn.Embedding(ACTIONS, dim)
        self.position = nn.Parameter(torch.randn(history, dim) * 0.02)
        self.encoder = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.user_dense = nn.Linear(USER_DENSE, dim)
        self.cand_tower = nn.Sequential(nn.Linear(dim + CAND_DENSE, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.query = nn.Linear(dim, dim)
        self.head = nn.Sequential(nn.Linear(4 * dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(
        self,
        history: torch.Tensor,
        actions: torch.Tensor,
        user_dense: torch.Tensor,
        cand_item: torch.Tensor,
        cand_dense: torch.Tensor,
    ) -> torch.Tensor:
        if self.keep < history.shape[1]:
            history, actions = history[:, -self.keep :], actions[:, -self.keep :]
        h = self.item(history) + self.action(actions) + self.position[-self.keep :]
        for block in self.encoder[: self.depth]:
            h = block(h)
        h = self.norm(h)  # [N, L, d]
        cand = self.cand_tower(torch.cat([self.item(cand_item), cand_dense], dim=-1))  # [N, d]
        q = self.query(cand).unsqueeze(1).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [N, H, 1, dh]
        kv = h.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        target = F.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).flatten(1)  # [N, d]
        user = self.user_dense(user_dense) + h.mean(dim=1)
        logit = self.head(torch.cat([target, user, cand, target * cand], dim=-1))
        return torch.sigmoid(logit).squeeze(-1)


def build(size: str = "tiny", seed: int = 0, keep: int | None = None, depth: int | None = None) -> Workload:
    """The ranker; ``keep``/``depth`` give a short-history, shallower variant of the same weights and inputs."""
    cfg = SIZES[size]
    torch.manual_seed(seed)
    dim, heads, layers, length, items = (int(cfg[k]) for k in ("dim", "heads", "layers", "history", "items"))
    model = UserSequenceRanker(dim, heads, layers, length, items, keep, depth).eval()

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        inputs = {
            "history": per_request(zipf_ids(items, (r, length), generator=g), counts),
            "actions": per_request(torch.randint(0, ACTIONS, (r, length), generator=g), counts),
            "user_dense": per_request(torch.randn(r, USER_DENSE, generator=g), counts),
            "cand_item": zipf_ids(items, n, generator=g),
            "cand_dense": torch.randn(n, CAND_DENSE, generator=g),
        }
        return RequestBatch(inputs, offsets_from_counts(counts))

    spec = RequestSpec(request_inputs=("history", "actions", "user_dense"))
    return Workload(
        "useq",
        model,
        spec,
        make_batch,
        description=f"user-sequence transformer ranker ({size})"
        + (
            f", last {model.keep} items through {model.depth} blocks" if (keep, depth) != (None, None) else ""
        ),
        metadata={"size": size, "keep": model.keep, "depth": model.depth},
    )
