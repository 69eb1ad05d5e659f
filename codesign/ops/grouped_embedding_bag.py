"""``codesign::grouped_embedding_bag``: many EmbeddingBag lookups as one (the TBE idea).

Ranking models look up tens to hundreds of tables per request, each a separate small kernel. The
fusion pass concatenates tables of equal width and dtype into one weight and rewrites their
lookups to this op:

    out = grouped_embedding_bag(weight, [idx_0, ..., idx_T-1], [off_0, ...], table_starts, mode)

``table_starts`` has T+1 entries: table t owns rows ``table_starts[t]:table_starts[t+1]`` of
``weight``. The output stacks every table's bags, table by table: rows ``sum(B_<t):sum(B_<=t)``
are table t's ``embedding_bag(idx_t, off_t)``. Indices are checked against their own table (a
bad id raises like ``nn.EmbeddingBag`` does rather than reading a neighbouring table). The CPU
path runs one ``embedding_bag`` over shifted ids; CUDA runs a Triton gather-reduce kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "EMBEDDING_BAG_MODES",
    "flatten_groups",
    "grouped_embedding_bag",
    "grouped_embedding_bag_reference",
]

EMBEDDING_BAG_MODES = {0: "sum", 1: "mean", 2: "max"}


def flatten_groups(
    indices: Sequence[torch.Tensor], offsets: Sequence[torch.Tensor], table_starts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted ids into the concatenated weight, and bag offsets into them with a closing end entry."""
    if len(indices) != len(offsets) or len(table_starts) != len(indices) + 1:
        raise ValueError(
            f"grouped_embedding_bag: {len(indices)} index tensors, {len(offsets)} offset tensors and "
            f"{len(table_starts)} table starts; expected T, T and T+1"
        )
    device = indices[0].device
    starts = torch.tensor(table_starts, dtype=torch.int64, device=device)
    lengths = torch.tensor([i.numel() for i in indices], dtype=torch.int64, device=device)
    bags = torch.tensor([o.numel() for o in offsets], dtype=torch.int64, device=device)
    local = torch.cat([i.reshape(-1).to(torch.int64) for i in indices])
    rows = starts[1:] - starts[:-1]
    limit = torch.repeat_interleave(rows, lengths)
    bad = (local < 0) | (local >= limit)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        table = int(
            torch.searchsorted(torch.cumsum(lengths, 0), torch.tensor(first, device=device), right=True)
        )
        raise IndexError(
            f"grouped_embedding_bag: id {int(local[first])} is out of range for table {table} of the group "
            f"({int(rows[table])} rows)"
        )
    shifted = local + torch.repeat_interleave(starts[:-1], lengths)
    first_index = torch.cumsum(lengths, 0) - lengths
    bag_offsets = torch.cat([o.reshape(-1).to(torch.int64) for o in offsets])
    bag_offsets = bag_offsets + torch.repeat_interleave(first_index, bags)
    end = torch.tensor([shifted.numel()], dtype=torch.int64, device=device)
    return shifted, torch.cat([bag_offsets, end])


def grouped_embedding_bag_reference(
    weight: torch.Tensor,
    indices: Sequence[torch.Tensor],
    offsets: Sequence[torch.Tensor],
    table_starts: Sequence[int],
    mode: int,
) -> torch.Tensor:
    """Reference semantics (also the CPU implementation): one ``embedding_bag`` over shifted ids."""
    if mode not in EMBEDDING_BAG_MODES:
        raise ValueError(f"grouped_embedding_bag: mode {mode} is not one of {EMBEDDING_BAG_MODES}")
    ids, bag_offsets = flatten_groups(indices, offsets, table_starts)
    out, *_ = torch.ops.aten._embedding_bag_forward_only(
        weight, ids, bag_offsets, False, mode, False, None, True
    )
    return out


@torch.library.custom_op("codesign::grouped_embedding_bag", mutates_args=())
def grouped_embedding_bag(
    weight: torch.Tensor,
    indices: list[torch.Tensor],
    offsets: list[torch.Tensor],
    table_starts: list[int],
    mode: int,
) -> torch.Tensor:
    if weight.is_cuda:
        from codesign.ops.grouped_embedding_bag_triton import grouped_embedding_bag_triton

        return grouped_embedding_bag_triton(weight, indices, offsets, table_starts, mode)
    return grouped_embedding_bag_reference(weight, indices, offsets, table_starts, mode)


@grouped_embedding_bag.register_fake
def _(
    weight: torch.Tensor,
    indices: list[torch.Tensor],
    offsets: list[torch.Tensor],
    table_starts: list[int],
    mode: int,
) -> torch.Tensor:
    bags = sum(o.shape[0] for o in offsets)
    return weight.new_empty((bags, weight.shape[1]))
