"""EmbeddingBag modes and the id flattening a grouped lookup does before its gather.

Shared by the CPU path (``grouped_embedding_bag``), the Triton path (``grouped_embedding_bag_triton``)
and the quantized bag; kept apart from both lookups so the kernel module need not import the op
module that loads it (no import cycle).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["EMBEDDING_BAG_MODES", "flatten_groups"]

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
