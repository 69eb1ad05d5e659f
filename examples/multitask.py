"""Multi-task CTR + CVR ranker (MMoE experts, ESMM-style pCTCVR = pCTR x pCVR).

Takes ONE concatenated float feature tensor ``x`` [N, F], as many production CTR models do:
columns [user dense | user segment id | user embedding | ad dense | ad category id | ad embedding].
Ids are stored as floats and cast inside the model. The user block (first columns) repeats on
every candidate row.
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
    "tiny": {
        "dense": 8,
        "emb": 8,
        "expert": (16,),
        "experts": 2,
        "tower": (8,),
        "segments": 16,
        "categories": 32,
    },
    "small": {
        "dense": 32,
        "emb": 64,
        "expert": (256, 128),
        "experts": 4,
        "tower": (64,),
        "segments": 256,
        "categories": 2_000,
    },
    "large": {
        "dense": 64,
        "emb": 256,
        "expert": (1024, 512),
        "experts": 8,
        "tower": (256, 64),
        "segments": 1024,
        "categories": 20_000,
    },
}
ID_DIM = 8


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class MultiTaskRanker(nn.Module):
    def __init__(
        self,
        dense: int,
        emb: int,
        expert: Sequence[int],
        experts: int,
        tower: Sequence[int],
        segments: int,
        categories: int,
    ) -> None:
        super().__init__()
        self.dense, self.emb = dense, emb
        self.segment = nn.Embedding(segments, ID_DIM)
        self.category = nn.Embedding(categories, ID_DIM)
        width = 2 * (dense + emb + ID_DIM)
        self.experts = nn.ModuleList(_mlp([width, *expert]) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(width, experts) for _ in range(2))
        self.towers = nn.ModuleList(
            nn.Sequential(_mlp([expert[-1], *tower]), nn.Linear(tower[-1], 1)) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        d, e = self.dense, self.emb
        user_dense, seg, user_emb = x[:, :d], x[:, d], x[:, d + 1 : d + 1 + e]
        a = d + 1 + e
        ad_dense, cat, ad_emb = x[:, a : a + d], x[:, a + d], x[:, a + d + 1 : a + d + 1 + e]
        h = torch.cat(
            [user_dense, self.segment(seg.long()), user_emb, ad_dense, self.category(cat.long()), ad_emb],
            dim=1,
        )
        expert_out = torch.stack([expert(h) for expert in self.experts], dim=1)  # [N, E, H]
        logits = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            w = torch.softmax(gate(h), dim=-1).unsqueeze(-1)
            logits.append(tower((w * expert_out).sum(dim=1)).squeeze(-1))
        ctr, cvr = torch.sigmoid(logits[0]), torch.sigmoid(logits[1])
        return {"ctr": ctr, "cvr": cvr, "ctcvr": ctr * cvr}


def build(size: str = "tiny", seed: int = 0) -> Workload:
    cfg = SIZES[size]
    torch.manual_seed(seed)
    dense, emb, segments, categories = (int(cfg[k]) for k in ("dense", "emb", "segments", "categories"))  # type: ignore[call-overload]
    model = MultiTaskRanker(
        dense,
        emb,
        cfg["expert"],
        int(cfg["experts"]),
        cfg["tower"],  # type: ignore[arg-type, call-overload]
        segments,
        categories,
    ).eval()
    user_width = dense + 1 + emb

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user = torch.cat(
            [
                torch.rand(r, dense, generator=g),
                zipf_ids(segments, (r, 1), generator=g).float(),
                torch.randn(r, emb, generator=g) * 0.5,
            ],
            dim=1,
        )
        ad = torch.cat(
            [
                torch.rand(n, dense, generator=g),
                zipf_ids(categories, (n, 1), generator=g).float(),
                torch.randn(n, emb, generator=g) * 0.5,
            ],
            dim=1,
        )
        x = torch.cat([per_request(user, counts), ad], dim=1)
        return RequestBatch({"x": x}, offsets_from_counts(counts))

    spec = RequestSpec(request_columns={"x": ((0, user_width),)})
    return Workload(
        "multitask", model, spec, make_batch, description=f"MMoE CTR+CVR ({size})", metadata={"size": size}
    )
