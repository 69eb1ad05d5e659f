"""Multi-gate mixture of experts (Ma et al., 2018): shared experts, one softmax gate and tower per task.

``user_feats`` [B, 3] ids and ``user_dense`` [B, 2] are request-level; ``item_feats`` [B, 2] ids and
``context`` [B, 3] are per candidate. Returns ``{"click": p_click, "like": p_like}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import per_request, zipf_ids

USER_DIMS = (1000, 20, 8)  # user id, age bucket, platform
ITEM_DIMS = (900, 64)  # item id, author bucket
USER_DENSE = 2
CONTEXT = 3
EMBED_DIM = 8
TASKS = ("click", "like")


class MMoE(nn.Module):
    def __init__(
        self, field_dims: Sequence[int], num_dense: int, dim: int, num_experts: int, expert_width: int
    ) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList([nn.Embedding(n, dim) for n in field_dims])
        in_width = len(field_dims) * dim + num_dense
        self.experts = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(in_width, 64), nn.ReLU(), nn.Linear(64, expert_width), nn.ReLU())
                for _ in range(num_experts)
            ]
        )
        self.gates = nn.ModuleDict({t: nn.Linear(in_width, num_experts) for t in TASKS})
        self.towers = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(expert_width, 16), nn.ReLU(), nn.Linear(16, 1)) for t in TASKS}
        )

    def forward(
        self,
        user_feats: torch.Tensor,
        user_dense: torch.Tensor,
        item_feats: torch.Tensor,
        context: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        ids = torch.cat([user_feats, item_feats], dim=1)
        embs = [emb(ids[:, i]) for i, emb in enumerate(self.embeddings)]
        x = torch.cat([*embs, user_dense, context], dim=1)
        expert_out = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        outputs = {}
        for task in TASKS:
            gate = torch.softmax(self.gates[task](x), dim=-1)  # [B, E]
            mixed = torch.sum(gate.unsqueeze(-1) * expert_out, dim=1)
            outputs[task] = torch.sigmoid(self.towers[task](mixed)).squeeze(-1)
        return outputs


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    model = MMoE((*USER_DIMS, *ITEM_DIMS), USER_DENSE + CONTEXT, EMBED_DIM, num_experts=3, expert_width=16)

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user = torch.stack([zipf_ids(d, r, generator=g) for d in USER_DIMS], 1)
        item = torch.stack([zipf_ids(d, n, generator=g) for d in ITEM_DIMS], 1)
        inputs = {
            "user_feats": per_request(user, counts),
            "user_dense": per_request(torch.randn(r, USER_DENSE, generator=g), counts),
            "item_feats": item,
            "context": torch.rand(n, CONTEXT, generator=g),
        }
        return RequestBatch(inputs, offsets_from_counts(counts))

    spec = RequestSpec(request_inputs=("user_feats", "user_dense"))
    return Workload(
        "mmoe",
        model.eval(),
        spec,
        make_batch,
        description="MMoE: 3 experts, 2 gated task towers, dict output",
    )
