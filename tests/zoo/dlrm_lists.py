"""DLRM (Naumov et al., 2019) the way its reference code takes a batch: dense + Python lists of bags.

``forward(dense, indices, offsets)``: ``indices[k]`` / ``offsets[k]`` feed ``nn.EmbeddingBag(mode="sum")``
table k. Tables 0-1 hold user bags (recent categories, followed creators) that are the same bag on
every candidate row of a request; tables 2-4 hold candidate bags. Dense columns 0-2 are user counters.
Bottom MLP, pairwise dot interaction (``bmm`` and a strict upper-triangle index buffer), top MLP.

``build(interaction_indices="inline")`` picks the pairs as the reference implementation does, with
index tensors built from Python lists inside ``forward`` (``torch.tensor([...])``, which export
captures as a fresh copy of a constant); the zoo names that model ``dlrm_reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from codesign import RequestBatch, RequestSpec, Workload
from codesign.ir.request import offsets_from_counts
from codesign.ir.synthetic import jagged_ids, per_request, repeat_bags

TABLE_ROWS = (300, 500, 800, 120, 60)
USER_TABLES = (0, 1)
NUM_DENSE = 6
USER_DENSE = 3
EMBED_DIM = 8
MAX_BAG = 4


def make_mlp(sizes: Sequence[int], sigmoid_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        last = i == len(sizes) - 2
        layers.append(nn.Sigmoid() if last and sigmoid_last else nn.ReLU())
    return nn.Sequential(*layers)


class DLRMNet(nn.Module):
    def __init__(
        self,
        table_rows: Sequence[int],
        dim: int,
        bottom: Sequence[int],
        top: Sequence[int],
        interaction_indices: str = "buffer",
    ) -> None:
        super().__init__()
        self.interaction_indices = interaction_indices
        self.dim = dim
        self.emb_l = nn.ModuleList([nn.EmbeddingBag(n, dim, mode="sum") for n in table_rows])
        self.bot_l = make_mlp([NUM_DENSE, *bottom, dim])
        num_vectors = len(table_rows) + 1
        li, lj = torch.triu_indices(num_vectors, num_vectors, offset=1)
        self.register_buffer("li", li, persistent=False)
        self.register_buffer("lj", lj, persistent=False)
        num_pairs = num_vectors * (num_vectors - 1) // 2
        self.top_l = make_mlp([dim + num_pairs, *top, 1], sigmoid_last=True)

    def apply_emb(self, indices: list[torch.Tensor], offsets: list[torch.Tensor]) -> list[torch.Tensor]:
        return [bag(idx, off) for bag, idx, off in zip(self.emb_l, indices, offsets, strict=True)]

    def interact_features(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        batch_size = x.shape[0]
        T = torch.cat([x, *ly], dim=1).view((batch_size, -1, self.dim))
        Z = torch.bmm(T, torch.transpose(T, 1, 2))
        if self.interaction_indices == "inline":  # the reference code: lower triangle, from lists
            _, ni, nj = Z.shape
            li = torch.tensor([i for i in range(ni) for j in range(i)])
            lj = torch.tensor([j for i in range(nj) for j in range(i)])
            Zflat = Z[:, li, lj]
        else:
            Zflat = Z[:, self.li, self.lj]
        return torch.cat([x, Zflat], dim=1)

    def forward(
        self, dense: torch.Tensor, indices: list[torch.Tensor], offsets: list[torch.Tensor]
    ) -> torch.Tensor:
        x = self.bot_l(dense)
        ly = self.apply_emb(indices, offsets)
        z = self.interact_features(x, ly)
        return self.top_l(z).squeeze(1)


def build(seed: int = 0, interaction_indices: str = "buffer") -> Workload:
    """``interaction_indices="inline"``: the pair indices are built in forward, as the reference code does."""
    torch.manual_seed(seed)
    model = DLRMNet(
        TABLE_ROWS, EMBED_DIM, bottom=(32, 16), top=(32, 16), interaction_indices=interaction_indices
    )

    def make_batch(candidates: Sequence[int], seed: int) -> RequestBatch:
        g = torch.Generator().manual_seed(seed)
        counts = torch.as_tensor(list(candidates), dtype=torch.int64)
        r, n = counts.numel(), int(counts.sum())
        user_dense = torch.rand(r, USER_DENSE, generator=g).mul_(10).log1p_()
        dense = torch.cat(
            [per_request(user_dense, counts), torch.rand(n, NUM_DENSE - USER_DENSE, generator=g)], 1
        )
        indices, offsets = [], []
        for k, rows in enumerate(TABLE_ROWS):
            if k in USER_TABLES:  # one bag per request, repeated on each of its candidate rows
                lengths = torch.randint(1, MAX_BAG + 1, (r,), generator=g)
                values, _ = jagged_ids(rows, lengths, generator=g)
                idx, off = repeat_bags(values, lengths, counts)
            else:
                lengths = torch.randint(1, MAX_BAG + 1, (n,), generator=g)
                idx, off = jagged_ids(rows, lengths, generator=g)
            indices.append(idx)
            offsets.append(off)
        return RequestBatch(
            {"dense": dense, "indices": indices, "offsets": offsets}, offsets_from_counts(counts)
        )

    spec = RequestSpec(
        request_inputs=tuple(f"indices.{k}" for k in USER_TABLES),
        request_columns={"dense": ((0, USER_DENSE),)},
        jagged={f"indices.{k}": f"offsets.{k}" for k in range(len(TABLE_ROWS))},
    )
    name = "dlrm_lists" if interaction_indices == "buffer" else "dlrm_reference"
    return Workload(
        name,
        model.eval(),
        spec,
        make_batch,
        description="DLRM: EmbeddingBag lists, bmm + triu interaction",
    )
